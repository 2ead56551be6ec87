"""``bk-bench tune``: quality-constrained tuning of a technique's knobs with Optuna.

Each trial fine-tunes the technique from the dense model at one knob setting and measures it
(``Bench.measure``: paired wall speedup, FLOPs, work, perplexity). Trials score perplexity on the
validation split (``--quality-split``, default valid), so that the test split, which
``--validate`` re-measures the chosen configuration on, had no part in choosing it: a choice
made on the split that reports it is biased towards the points whose noise flattered them, most
of all at the budget's edge. The default objective is the measured wall speedup, maximised
subject to ``quality_delta <= max_degradation``. The constraint is Optuna's: its value
``quality_delta - max_degradation`` (feasible when <= 0) is set with ``Trial.set_constraint``
(Optuna 5's replacement for the deprecated samplers' ``constraints_func``; TPE, GP and
``study.best_trial`` read it) and copied to ``trial.user_attrs["constraint"]``, so infeasible
trials are recorded as infeasible, never hidden behind a penalty value.

Any number of workers share one study through Optuna's RDB storage (SQLite by default,
PostgreSQL across machines). Heartbeats mark a killed worker's trial FAIL and
``RetryHeartbeatStaleTrialCallback`` queues it again; every worker keeps the shared count of
trials exact (see ``_Worker``). A Bayesian sampler is seeded per trial from ``--seed`` and the
trial number, so workers explore different points and a study repeats with its seed. The first
worker records the study's settings (search, budget, setup, corpus content); a worker with other
settings is refused, naming the settings that differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.cli import (
    add_setup_arguments,
    add_split_argument,
    parse_values,
    positive_int,
    setup_from,
)
from bench.files import dump_json, figure_writer, publish, read_json, write_atomic

if TYPE_CHECKING:  # the model code is imported where it runs: `bk-bench tune --help` needs none
    from bench.pipeline import Setup
    from bench.registry import Knob, Technique
    from bench.rows import Row
    from bk.data import Corpus

# (study direction, what the value is) for each --score-metric.
SCORES = {
    "speedup": ("maximize", "measured wall speedup over dense (paired)"),
    "perplexity": ("minimize", "candidate perplexity on the quality split"),
    "layers": ("minimize", "mean layers executed per token (executed-FLOPs ratio x n_layers if "
                           "the technique reports no layer statistic)"),
    "balanced": ("minimize", "(1 + quality_delta) x fraction of the layers executed per token"),
}
ACT_ALIASES = {"thresholds": "act_threshold", "lambdas": "act_lambda"}
HOLDING = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


class MeasurementError(ValueError):
    """A trial whose measurement cannot be scored (for example a non-finite perplexity)."""


# ----------------------------------------------------------------------------- search space

def _range_points(knob: Knob, n_points: int) -> list[Any]:
    low, high = knob.search_range
    spaced = (np.logspace(math.log10(low), math.log10(high), n_points) if knob.log
              else np.linspace(low, high, n_points))
    if knob.kind is int:
        return sorted({int(round(v)) for v in spaced})
    return [float(f"{v:.6g}") for v in spaced]


def grid_space(technique: Technique, explicit: Mapping[str, Sequence[Any]],
               n_points: int) -> dict[str, list[Any]]:
    """The values a grid search tries per knob: explicit lists first, then each knob's declared
    grid, its choices, or ``n_points`` points over its low/high range; knobs with none of these
    stay at their default and are not searched."""
    space = {}
    for knob in technique.knobs:
        if knob.name in explicit:
            space[knob.name] = list(explicit[knob.name])
        elif knob.grid:
            space[knob.name] = list(knob.grid)
        elif knob.choices:
            space[knob.name] = list(knob.choices)
        elif knob.search_range is not None:
            space[knob.name] = _range_points(knob, n_points)
    return space


def suggest(trial: optuna.Trial, technique: Technique,
            explicit: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Knob values for a Bayesian trial: explicit lists, choices and grid-only knobs are
    categorical; low/high ranges are continuous (int for int knobs; log-uniform when ``log``)."""
    knobs = {}
    for knob in technique.knobs:
        if knob.name in explicit:
            knobs[knob.name] = trial.suggest_categorical(knob.name, list(explicit[knob.name]))
        elif knob.choices:
            knobs[knob.name] = trial.suggest_categorical(knob.name, list(knob.choices))
        elif knob.search_range is not None and knob.kind in (int, float):
            low, high = knob.search_range
            suggest_range = trial.suggest_int if knob.kind is int else trial.suggest_float
            knobs[knob.name] = suggest_range(knob.name, low, high, log=knob.log)
        elif knob.grid:
            knobs[knob.name] = trial.suggest_categorical(knob.name, list(knob.grid))
    return knobs


# ----------------------------------------------------------------------------- scoring

def figures(row: Row) -> dict[str, Any]:
    """The measured figures of one trial: its row's JSON form (``Row.to_dict``)."""
    return row.to_dict()


def score(metric: str, row: Row, n_layers: int) -> float:
    """The objective value of a measured trial for ``metric`` (see ``SCORES``)."""
    if metric == "speedup":
        return row.wall_speedup
    if metric == "perplexity":
        return row.candidate_perplexity
    layers = row.stats.get("mean_layers_per_token", row.work_ratio * n_layers)
    if metric == "layers":
        return layers
    if metric == "balanced":
        return (1 + row.quality_delta) * layers / n_layers
    raise ValueError(f"unknown score metric {metric!r}; expected one of {sorted(SCORES)}")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler made afresh for every trial, seeded from ``(seed, trial number)``.

    Optuna numbers trials atomically across workers, so concurrent workers never draw the same
    random points (one seed per process would make them propose identical trials), and a study
    repeats given its seed. TPE and GP keep no state between trials beyond the study itself.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def trial_seed(self, number: int) -> int:
        return int(np.random.SeedSequence([self._seed, number]).generate_state(1)[0])

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(self.trial_seed(trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(method: str, sampler: str, space: dict[str, list[Any]],
                 seed: int) -> optuna.samplers.BaseSampler:
    """Grid: one seed for all workers (GridSampler gives trial k grid point k of one shuffled
    order, which workers must share). Bayesian: seeded per trial (``TrialSeededSampler``)."""
    if method == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if sampler == "tpe":
        return TrialSeededSampler(lambda s: optuna.samplers.TPESampler(seed=s), seed)
    if sampler == "gp":
        return TrialSeededSampler(lambda s: optuna.samplers.GPSampler(seed=s), seed)
    raise ValueError(f"unknown sampler {sampler!r}; expected tpe or gp")


# ----------------------------------------------------------------------------- storage

def open_storage(url: str, heartbeat_interval: int,
                 grace_period: int) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a worker killed mid-trial stops beating, another worker
    marks its trial FAIL after ``grace_period`` seconds and queues a retry (WAITING)."""
    import sqlalchemy.exc

    url = _with_installed_driver(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.ProgrammingError) as err:
            # Workers starting together on a fresh database race to create its tables; the
            # loser finds them created on the next attempt.
            if attempt == 4:
                raise _storage_error(url, err) from err
            time.sleep(0.5 * (attempt + 1))
        except sqlalchemy.exc.SQLAlchemyError as err:  # a malformed URL, a missing driver
            raise _storage_error(url, err) from err
    raise AssertionError("unreachable")


def _storage_error(url: str, err: Exception) -> ValueError:
    reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return ValueError(f"cannot open the study storage {_redacted(url)}: {reason.strip()}")


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the ``postgres`` extra installs
    psycopg2, so a bare URL uses whichever of the two is installed."""
    import importlib.util

    if not url.startswith("postgresql://"):
        return url
    for module, dialect in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url[len("postgresql"):]
    raise ValueError(f"{_redacted(url)} needs a PostgreSQL driver: pip install "
                     f"'bk-bench[postgres]' (psycopg2-binary) or psycopg")


def holds(trial: FrozenTrial) -> bool:
    """Whether a trial counts toward the study's total: done, running or queued, or failed by
    its own measurement. A heartbeat-failed trial does not (its queued retry does); a pruned
    duplicate does not."""
    return trial.state in HOLDING or (trial.state == TrialState.FAIL
                                      and "error" in trial.user_attrs)


@dataclasses.dataclass
class Settings:
    technique: Technique
    method: str
    sampler: str
    metric: str
    max_degradation: float
    explicit: dict[str, list[Any]]
    space: dict[str, list[Any]]  # grid values (grid method) or {} for Bayesian
    target: int  # trials the study should hold

    def describe(self) -> dict[str, Any]:
        return {"technique": self.technique.name, "method": self.method,
                "sampler": None if self.method == "grid" else self.sampler,
                "score_metric": self.metric, "direction": SCORES[self.metric][0],
                "max_degradation": self.max_degradation, "explicit_values": self.explicit,
                "grid": self.space, "trials": self.target}


class _Worker:
    """One process's share of a study.

    Trials are taken one at a time while the study holds fewer than ``target`` trials. Optuna
    numbers trials atomically, and GridSampler gives trial number k grid point k, so concurrent
    workers split a fresh grid without overlap. Two rarer races remain (two workers seeing the
    last free slot at once; a retry racing a fresh trial): a trial that finds an earlier trial
    holding the same grid point, or ``target`` earlier holders, is pruned before measuring
    anything (user attr ``duplicate_of`` / ``surplus``).
    """

    def __init__(self, study: optuna.Study, settings: Settings,
                 measure: Callable[[Technique, dict[str, Any]], Row],
                 n_layers: Callable[[], int], progress: bool, poll_seconds: float) -> None:
        self.study, self.s, self.measure, self.n_layers = study, settings, measure, n_layers
        self.progress, self.poll_seconds = progress, poll_seconds

    def objective(self, trial: optuna.Trial) -> float:
        from bench.rows import RowError
        from bk.technique import KnobError
        from bk.train import TrainingDiverged

        s = self.s
        knobs = (suggest(trial, s.technique, s.explicit) if s.method == "bayesian"
                 else {name: trial.suggest_categorical(name, values)
                       for name, values in s.space.items()})
        earlier = [t for t in self.study.get_trials(deepcopy=False)
                   if t.number < trial.number and holds(t)]
        if len(earlier) >= s.target:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the study already holds {s.target} trials")
        if s.method == "grid":
            twin = next((t for t in earlier if t.params == knobs), None)
            if twin is not None:
                trial.set_user_attr("duplicate_of", twin.number)
                raise optuna.TrialPruned(f"grid point already taken by trial {twin.number}")
        try:
            c = self.measure(s.technique, knobs)
        # diverged, a non-finite figure, or knob values that contradict each other or the model
        except (TrainingDiverged, RowError, KnobError) as err:
            trial.set_user_attr("error", str(err))
            raise MeasurementError(str(err)) from err
        trial.set_user_attr("figures", figures(c))
        delta = c.quality_delta
        if delta is None:  # a row's figures are finite by construction (bench.rows)
            message = (f"no perplexity delta at {knobs}: the fine-tuned model cannot be "
                       "scored without a quality measurement")
            trial.set_user_attr("error", message)
            raise MeasurementError(message)
        trial.set_constraint("quality", delta - s.max_degradation)
        trial.set_user_attr("constraint", delta - s.max_degradation)
        value = score(s.metric, c, self.n_layers())
        if not math.isfinite(value):
            message = f"score {s.metric} is {value} at {knobs}"
            trial.set_user_attr("error", message)
            raise MeasurementError(message)
        return value

    def _state(self) -> tuple[int, bool, bool]:
        optuna.storages.fail_stale_trials(self.study)  # dead workers' trials -> FAIL + retry
        trials = self.study.get_trials(deepcopy=False)
        held = sum(holds(t) for t in trials)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        running = any(t.state == TrialState.RUNNING for t in trials)
        return held, waiting, running

    def run(self) -> None:
        from tqdm import tqdm

        held, _, _ = self._state()
        bar = tqdm(total=self.s.target, initial=min(held, self.s.target), unit="trial",
                   desc=f"tune {self.s.technique.name}", disable=not self.progress)
        while True:
            held, waiting, running = self._state()
            bar.n = min(held, self.s.target)
            bar.refresh()
            if held < self.s.target or waiting:
                self.study.optimize(self.objective, n_trials=1, catch=(MeasurementError,))
            elif running:
                # Another worker's trial is in flight: wait for it to finish or go stale (then
                # its retry is queued and taken above), so a resumed study ends complete.
                time.sleep(self.poll_seconds)
            else:
                break
        bar.n = self.s.target
        bar.close()


# ----------------------------------------------------------------------------- results

def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as written to optimization_results.json."""
    attrs = dict(t.user_attrs)
    constraint = attrs.pop("constraint", None)
    return {"number": t.number, "state": t.state.name, "knobs": dict(t.params),
            "value": t.value if t.value is not None and math.isfinite(t.value) else None,
            "feasible": t.state == TrialState.COMPLETE and constraint is not None
            and constraint <= 0,
            "constraint": constraint, "figures": attrs.pop("figures", {}),
            "retry_of": t.system_attrs.get("failed_trial"), **attrs}


def trial_front(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The COMPLETE trials on the Pareto front (``bench.rows.pareto_front``: wall speedup max,
    quality delta min), from the single-objective study's recorded figures (no second study,
    no extra measurements)."""
    from bench.rows import pareto_front

    done = [r for r in records if r["state"] == "COMPLETE"]
    return [done[i] for i in pareto_front(
        done, lambda r: (r["figures"]["wall_speedup"], r["figures"]["quality_delta"]))]


def best_record(study: optuna.Study, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The best feasible trial (Optuna's ``best_trial`` honours the stored constraints)."""
    try:
        number = study.best_trial.number
    except ValueError:  # no completed trial, or none feasible
        return None
    best = next(r for r in records if r["number"] == number)
    return best if best["feasible"] else None


def summary_text(settings: Settings, records: Sequence[dict[str, Any]],
                 best: dict[str, Any] | None, front: Sequence[dict[str, Any]],
                 split: str) -> str:
    direction = SCORES[settings.metric][0]
    feasible = sorted((r for r in records if r["feasible"]),
                      key=lambda r: r["value"] if direction == "minimize" else -r["value"])
    states: dict[str, int] = {}
    for r in records:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [f"bk-bench tune {settings.technique.name}: {settings.method} search, "
             f"score {settings.metric} ({direction}: {SCORES[settings.metric][1]}), quality "
             f"budget +{settings.max_degradation:.1%} perplexity on the {split} split",
             f"trials: {', '.join(f'{n} {k.lower()}' for k, n in sorted(states.items()))}; "
             f"{len(feasible)} feasible", "", "top feasible trials:"]
    lines += [f"  #{r['number']:<4} {_knobs_text(r['knobs'])}  score {r['value']:.4g}  "
              f"speedup {r['figures']['wall_speedup']:.2f}x  ppl delta "
              f"{r['figures']['quality_delta']:+.2%}  work ratio {r['figures']['work_ratio']:.2f}"
              for r in feasible[:5]] or ["  none within the budget"]
    lines += ["", "best: " + (f"trial #{best['number']} {_knobs_text(best['knobs'])}" if best
                              else "no feasible trial"),
              "", "Pareto front (speedup max, ppl delta min; by speedup):"]
    lines += [f"  #{r['number']:<4} {r['figures']['wall_speedup']:.2f}x  "
              f"{r['figures']['quality_delta']:+.2%}  {_knobs_text(r['knobs'])}" for r in front]
    return "\n".join(lines) + "\n"


def _knobs_text(knobs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


def _plot_grid_heatmap(settings: Settings, records: Sequence[dict[str, Any]]) -> bytes:
    """Wall speedup over a two-knob grid; infeasible cells hatched and marked 'x'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows_knob, cols_knob = list(settings.space)
    done = [r for r in records if r["state"] == "COMPLETE"]
    speed = pd.DataFrame(np.nan, index=settings.space[rows_knob], columns=settings.space[cols_knob])
    feasible = pd.DataFrame(True, index=speed.index, columns=speed.columns)
    for r in done:
        speed.loc[r["knobs"][rows_knob], r["knobs"][cols_knob]] = r["figures"]["wall_speedup"]
        feasible.loc[r["knobs"][rows_knob], r["knobs"][cols_knob]] = r["feasible"]
    fig, ax = plt.subplots(figsize=(1.2 * len(speed.columns) + 3, 0.8 * len(speed.index) + 2))
    sns.heatmap(speed, annot=True, fmt=".2f", cmap="viridis", ax=ax,
                cbar_kws={"label": "wall speedup (x)"})
    for i, row in enumerate(speed.index):
        for j, col in enumerate(speed.columns):
            if not feasible.loc[row, col] and not math.isnan(speed.loc[row, col]):
                ax.add_patch(plt.Rectangle((j, i), 1, 1, fill=False, hatch="xx",
                                           edgecolor="red", lw=0))
    ax.set_xlabel(cols_knob)
    ax.set_ylabel(rows_knob)
    ax.set_title(f"{settings.technique.name}: wall speedup (red hatch: ppl delta > "
                 f"+{settings.max_degradation:.1%})")
    fig.tight_layout()
    return _png(fig)


def _plot_pareto(settings: Settings, records: Sequence[dict[str, Any]],
                 front: Sequence[dict[str, Any]], split: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for ok, colour, label in ((True, "tab:blue", "feasible"), (False, "tab:gray", "infeasible")):
        pts = [r for r in done if r["feasible"] == ok]
        ax.scatter([100 * r["figures"]["quality_delta"] for r in pts],
                   [r["figures"]["wall_speedup"] for r in pts], c=colour, label=label, s=25)
    ax.plot([100 * r["figures"]["quality_delta"] for r in front],
            [r["figures"]["wall_speedup"] for r in front], "o-", color="tab:red", mfc="none",
            ms=10, label="Pareto front")
    ax.axvline(100 * settings.max_degradation, color="black", ls="--", lw=0.8,
               label="quality budget")
    ax.set_xlabel(f"{split} perplexity delta over dense (%)")
    ax.set_ylabel("wall speedup over dense (x)")
    ax.set_title(f"{settings.technique.name}: speedup against quality")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        figure_writer(fig)(png)
    finally:
        plt.close(fig)
    return png.getvalue()


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("optuna", "torch", "numpy", "pandas", "sqlalchemy", "seaborn", "matplotlib"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_outputs(out: Path, study: optuna.Study, settings: Settings, setup: Setup,
                  storage_url: str) -> dict[str, Any] | None:
    """Write every result file from the study's current state, as one set
    (``bench.files.publish``); return the best record."""
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    best = best_record(study, records)
    front = trial_front(records)
    reference = next((r["figures"].get("reference_perplexity") for r in records
                      if r["figures"].get("reference_perplexity") is not None), None)
    files: dict[str, str | bytes] = {
        "optimization_results.json": dump_json({
            "study": study.study_name, "trials": records,
            "pareto_front": [r["number"] for r in front]}),
        "optimization_metadata.json": dump_json({
            "study": study.study_name, "storage": _redacted(storage_url),
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": settings.describe(), "setup": setup.describe(),
            "finetune_steps": setup.finetune_steps(settings.technique),
            "baseline": {"reference_perplexity": reference,
                         "quality_split": setup.quality_split,
                         "reference": "dense model trained as long as each candidate "
                                      "(Bench.reference: "
                                      + ("the dense model, candidates trained from scratch)"
                                         if setup.start == "scratch" else "the dense control)"),
                         "quality_batches": setup.quality_batches},
            "packages": package_versions()}),
        "best_config.json": dump_json(
            {"technique": settings.technique.name, "feasible": False, "knobs": None,
             "reason": f"no trial within +{settings.max_degradation:.1%} perplexity on the "
                       f"{setup.quality_split} split", "quality_split": setup.quality_split}
            if best is None else
            {"technique": settings.technique.name, "feasible": True, "trial": best["number"],
             "knobs": best["knobs"], "score_metric": settings.metric, "score": best["value"],
             "figures": best["figures"], "max_degradation": settings.max_degradation,
             "finetune_fraction": settings.technique.finetune_fraction,
             "finetune_factor": setup.finetune_factor, "quality_split": setup.quality_split}),
        "optimization_summary.txt": summary_text(settings, records, best, front,
                                                 setup.quality_split),
    }
    if any(r["state"] == "COMPLETE" for r in records):
        files["pareto.png"] = _plot_pareto(settings, records, front, setup.quality_split)
        if settings.method == "grid" and len(settings.space) == 2:
            files["grid_heatmap.png"] = _plot_grid_heatmap(settings, records)
    publish(out, "tune", files)
    return best


def _redacted(url: str) -> str:
    """A storage URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{rest.split('@', 1)[1]}"
    return url


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("technique", help="a registered technique")
    group = parser.add_argument_group("search")
    group.add_argument("--method", choices=["grid", "bayesian"], default="bayesian")
    group.add_argument("--sampler", choices=["tpe", "gp"], default="tpe",
                       help="Bayesian sampler (default tpe)")
    group.add_argument("--n-calls", type=positive_int, default=20,
                       help="trials of a Bayesian search, shared by all workers (default 20)")
    group.add_argument("--n-points", type=positive_int, default=5,
                       help="grid points for a knob with a low/high range but no grid (5)")
    group.add_argument("--values", type=parse_values, action="append", metavar="NAME=V1,V2,...",
                       help="explicit values for one knob (repeatable)")
    group.add_argument("--thresholds", type=float, nargs="+",
                       help="ACT alias for --values act_threshold=...")
    group.add_argument("--lambdas", type=float, nargs="+",
                       help="ACT alias for --values act_lambda=...")
    group.add_argument("--max-degradation", type=float, default=0.01,
                       help="relative perplexity increase allowed on the quality split "
                            "(default 0.01)")
    group.add_argument("--score-metric", choices=sorted(SCORES), default="speedup",
                       help="speedup (default): maximise wall speedup; perplexity, layers, "
                            "balanced: minimise (see docs/tuning.md); all within the budget")
    group.add_argument("--validate", type=Path, metavar="BEST_CONFIG_JSON",
                       help="re-measure this configuration with quality on the test split "
                            "and write validation_results.json")
    group = parser.add_argument_group("shared study")
    group.add_argument("--storage", help="Optuna RDB URL (default sqlite:///OUTPUT/study.db)")
    group.add_argument("--study", help="study name (default tune-TECHNIQUE)")
    group.add_argument("--heartbeat-interval", type=positive_int, default=60,
                       help="seconds between a running trial's heartbeats (60)")
    group.add_argument("--grace-period", type=positive_int, default=120,
                       help="seconds without a heartbeat before a trial is failed (120)")
    add_setup_arguments(parser)
    add_split_argument(parser, "valid")


def explicit_values(args: argparse.Namespace, technique: Technique) -> dict[str, list[Any]]:
    explicit = dict(args.values or [])
    for alias, knob in ACT_ALIASES.items():
        if getattr(args, alias):
            explicit[knob] = list(getattr(args, alias))
    names = {k.name for k in technique.knobs}
    for name, values in explicit.items():
        if name not in names:
            raise ValueError(f"technique {technique.name!r} has no knob {name!r}; its knobs are "
                             f"{sorted(names) or 'none'}")
        if len(set(values)) != len(values):
            raise ValueError(f"values for {name} repeat: {values}")
        for value in values:  # every value checked before anything trains
            technique.resolve({name: value})
    return explicit


def _settings(args: argparse.Namespace, technique: Technique) -> Settings:
    if not technique.knobs:
        raise ValueError(f"technique {technique.name!r} has no knobs to tune")
    if not math.isfinite(args.max_degradation) or args.max_degradation < 0:
        raise ValueError(f"--max-degradation must be a finite number >= 0, got "
                         f"{args.max_degradation}")
    explicit = explicit_values(args, technique)
    if args.method == "grid":
        space = grid_space(technique, explicit, args.n_points)
        if not space:
            raise ValueError(f"technique {technique.name!r} declares no grid, choices or range; "
                             f"give values with --values NAME=V1,V2,...")
        target = math.prod(len(v) for v in space.values())
    else:
        space, target = {}, args.n_calls
    return Settings(technique, args.method, args.sampler, args.score_metric, args.max_degradation,
                    explicit, space, target)


def study_settings(settings: Settings, setup: Setup, corpus: Corpus) -> dict[str, Any]:
    """What every worker of a study must agree on: the search, the budget, the measurement
    setup and the corpus's content."""
    described = json.loads(dump_json(settings.describe()))
    described["finetune_fraction"] = settings.technique.finetune_fraction
    described["setup"] = {k: v for k, v in setup.describe().items() if k != "output"}
    described["corpus_fingerprint"] = corpus.fingerprint
    return described


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(stored: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """How a worker's study settings differ from the stored ones; a study recorded before a
    setting was added to ``Setup`` compares as recorded at its value then (ADDED_SETTINGS)."""
    from bench.baselines import ADDED_SETTINGS

    def completed(settings: Mapping[str, Any]) -> Mapping[str, Any]:
        if not isinstance(settings.get("setup"), Mapping):
            return settings
        return {**settings, "setup": {**ADDED_SETTINGS, **settings["setup"]}}

    a, b = _flat(completed(stored)), _flat(completed(ours))
    return [f"{k}: study {a.get(k)!r}, this worker {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _open_study(args: argparse.Namespace, settings: Settings, setup: Setup, corpus: Corpus,
                storage_url: str, wait_seconds: float = 30.0) -> optuna.Study:
    """Create the study and record its settings, or join it if they are ours; a worker with
    other settings raises ``ValueError`` naming them. Only the creator records the settings,
    so two workers starting at once never overwrite each other's."""
    storage = open_storage(storage_url, args.heartbeat_interval, args.grace_period)
    name = args.study or f"tune-{settings.technique.name}"
    sampler = make_sampler(settings.method, settings.sampler, settings.space, args.seed)
    described = study_settings(settings, setup, corpus)
    try:
        study = optuna.create_study(storage=storage, study_name=name,
                                    direction=SCORES[settings.metric][0], sampler=sampler)
        study.set_user_attr("settings", described)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    deadline = time.monotonic() + wait_seconds
    while (stored := study.user_attrs.get("settings")) is None:  # the creator is recording
        if time.monotonic() > deadline:
            raise ValueError(f"study {name!r} in {_redacted(storage_url)} records no settings "
                             "(made by another tool, or its creator stopped before recording "
                             "them); use another --study name")
        time.sleep(0.2)
    differ = settings_differences(stored, described)
    if differ:
        raise ValueError(f"study {name!r} in {_redacted(storage_url)} was created with other "
                         f"settings ({'; '.join(differ)}); join it with the study's settings, "
                         "or use another --study name")
    return study


def run(args: argparse.Namespace) -> int:
    from bench.pipeline import Bench
    from bench.registry import get
    from bk.data import load_corpus

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and fail_stale_trials are marked experimental; they are what we rely on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    technique = get(args.technique)
    setup = setup_from(args)
    out = setup.output
    if args.validate is not None:
        return validate(args.validate, technique, setup, out)
    settings = _settings(args, technique)
    out.mkdir(parents=True, exist_ok=True)
    storage_url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    corpus = load_corpus(setup.corpus)  # read once: the study's fingerprint is of this data
    study = _open_study(args, settings, setup, corpus, storage_url)
    bench = Bench(setup, corpus)
    n_layers = setup.model_config(corpus).n_layers
    _Worker(study, settings, bench.measure, lambda: n_layers, setup.progress,
            poll_seconds=min(5, args.heartbeat_interval)).run()
    best = write_outputs(out, study, settings, setup, storage_url)
    print((out / "optimization_summary.txt").read_text(), end="")
    print(f"\nwritten: {out}/best_config.json, optimization_results.json, "
          f"optimization_metadata.json, optimization_summary.txt, pareto.png"
          + (", grid_heatmap.png" if settings.method == "grid" and len(settings.space) == 2
             else ""))
    return 0 if best is not None else 1


def validate(path: Path, technique: Technique, setup: Setup, out: Path) -> int:
    """Re-measure a best_config.json with quality on the test split, whatever split chose it;
    write validation_results.json.

    The configuration fine-tunes as long as it did when it was tuned: its recorded
    ``finetune_fraction`` and ``finetune_factor`` replace the technique's and the setup's."""
    from bench.pipeline import Bench

    chosen = read_json(path)
    if not isinstance(chosen, dict) or not isinstance(chosen.get("knobs"), dict):
        raise ValueError(f"{path} holds no configuration to validate (expected a best_config.json "
                         f"with a 'knobs' object)")
    if chosen.get("technique") != technique.name:
        raise ValueError(f"{path} is for technique {chosen.get('technique')!r}, not "
                         f"{technique.name!r}")
    budget = float(chosen.get("max_degradation", 0.01))
    fraction = float(chosen.get("finetune_fraction", technique.finetune_fraction))
    technique = dataclasses.replace(technique, finetune_fraction=fraction)
    setup = dataclasses.replace(setup, quality_split="test", finetune_factor=float(
        chosen.get("finetune_factor", setup.finetune_factor)))
    tuned_split = chosen.get("quality_split", "test")  # configurations before the split: test
    c = Bench(setup).measure(technique, chosen["knobs"])
    measured = figures(c)
    delta = c.quality_delta
    feasible = delta is not None and math.isfinite(delta) and delta <= budget
    write_atomic(out / "validation_results.json", dump_json({
        "technique": technique.name, "knobs": chosen["knobs"], "source": str(path),
        "max_degradation": budget, "finetune_fraction": fraction,
        "finetune_steps": setup.finetune_steps(technique), "feasible": feasible,
        "figures": measured,
        "tuned_figures": chosen.get("figures"), "tuned_quality_split": tuned_split,
        "setup": setup.describe(),
        "written": datetime.now(UTC).isoformat(timespec="seconds")}))
    tuned = (chosen.get("figures") or {}).get("quality_delta")
    print(f"validation of {technique.name} {_knobs_text(chosen['knobs'])}: speedup "
          f"{measured['wall_speedup']:.2f}x, test ppl delta "
          + ("n/a" if measured["quality_delta"] is None else f"{measured['quality_delta']:+.2%}")
          + f" ({'within' if feasible else 'outside'} +{budget:.1%}"
          + ("" if tuned is None else f"; {tuned:+.2%} on the {tuned_split} split when tuned")
          + f"); written {out / 'validation_results.json'}")
    return 0 if feasible else 1
