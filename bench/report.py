"""`bk-bench report`: one static HTML page over everything bk-bench has measured.

Inputs, each optional: the results of ``bk-bench run`` (results.json, and tokens.json beside
it), the per-commit records in ``baselines/``, tuner folders (optimization_results.json,
best_config.json), asv's results and its published HTML. Output: ``<output>/index.html`` and its
PNGs. The page has no scripts, no external resources and only relative links, so it loads
offline, and it stands alone: it opens with the headline and the speed-against-quality figure,
says how to read them, and carries asv's per-commit series as static plots and tables.
"""

from __future__ import annotations

import argparse
import collections
import html
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import console
from bench.figures import Series, SpeedPoint, asv_history, speed_quality
from bench.files import figure_writer, read_json, write_atomic
from bench.rows import Row, knobs_text, pareto_front

if TYPE_CHECKING:
    from bench.baselines import Target

GAP_FLAG = 1.5  # FLOPs and wall speedups differing by more than this factor are flagged
ASV_DEFAULT_THRESHOLD = 0.05  # asv's own default when no regressions_thresholds regex matches
ASV_RESULTS, ASV_HTML, ASV_CONFIG = Path(".asv/results"), Path(".asv/html"), Path("asv.conf.json")


# ---------------------------------------------------------------------------------------------
# Inputs


def _number(value: Any, what: str, required: bool = False) -> float | None:
    """A finite float, or None for a missing optional figure; anything else is an error."""
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} is {value!r}; expected a number"
                         + ("" if required else " or null"))
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}; expected a finite number"
                         + ("" if required else " or null (missing)"))
    return float(value)


def gap(row: Row) -> float | None:
    """FLOPs speedup over wall speedup: 1 when the counted savings all reach the clock."""
    return None if row.flops_speedup is None else row.flops_speedup / row.wall_speedup


@dataclass(frozen=True)
class RunResults:
    path: Path
    record: dict[str, Any]
    rows: list[Row]


def load_results(path: Path) -> RunResults:
    """``bk-bench run``'s results.json ({"record": ..., "rows": [...]}), or the rows alone as
    ``bk-bench sweep`` writes them (sweeps/TECHNIQUE-KNOB.json)."""
    data = read_json(path)
    if isinstance(data, list):
        data = {"record": {}, "rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("record"), dict):
        raise ValueError(f"{path} is not a bk-bench results file (expected a 'record' object "
                         "or a list of rows)")
    record = _run_record(data["record"], str(path))
    raw = data.get("rows")
    if raw is None:  # only the record: its techniques lack the dense A/A row and the stats
        raw = [{"technique": name, **row} for name, row in record.get("techniques", {}).items()]
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ValueError(f"{path}: 'rows' must be a list of objects")
    scale = (record.get("setup") or {}).get("scale", "tiny")  # older results: all tiny
    return RunResults(path, record, [Row.from_dict(r, str(path), scale) for r in raw])


def _run_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """The record of a results file, its fields checked where the page reads them."""
    for name in ("setup", "machine", "quality", "cumulative", "techniques"):
        if not isinstance(record.get(name, {}), dict):
            raise ValueError(f"{where}: record field {name!r} is not an object")
    for name, value in record.get("quality", {}).items():
        _number(value, f"{where}: record quality {name}", required=True)
    if record.get("cumulative"):
        _number(record["cumulative"].get("speedup"), f"{where}: record cumulative speedup",
                required=True)
    return record


@dataclass(frozen=True)
class TokenView:
    """tokens.json of ``bk-bench run`` (``bench.tokens``): a passage of test text and each
    technique's per-token statistics over it."""

    path: Path
    tokens: list[str]
    level: str
    window: int
    n_layers: int
    techniques: dict[str, dict[str, list[float]]]


def load_tokens(path: Path) -> TokenView | None:
    """The per-token statistics file, checked: one finite value per token for every statistic
    (None when the file is absent)."""
    if not path.is_file():
        return None
    data = read_json(path)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if (not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)
            or not isinstance(data.get("techniques"), dict)):
        raise ValueError(f"{path} is not a bk-bench tokens file (expected 'tokens', a list of "
                         "strings, and 'techniques', an object)")
    sizes = {}
    for name in ("window", "n_layers"):
        size = data.get(name)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{path}: {name} is {size!r}; expected a positive integer")
        sizes[name] = size
    techniques = {}
    for name, stats in data["techniques"].items():
        what = f"{path}: technique {name!r}"
        if not isinstance(stats, dict):
            raise ValueError(f"{what} is not an object of per-token statistics")
        for stat, values in stats.items():
            if not isinstance(values, list) or len(values) != len(tokens):
                raise ValueError(f"{what} {stat}: expected a list of {len(tokens)} values, one "
                                 "per token")
            for v in values:
                _number(v, f"{what} {stat}", required=True)
        techniques[str(name)] = {str(k): [float(v) for v in vs] for k, vs in stats.items()}
    return TokenView(path, tokens, str(data.get("level", "char")), sizes["window"],
                     sizes["n_layers"], techniques)


@dataclass(frozen=True)
class Trial:
    number: int
    speedup: float
    quality_delta: float
    feasible: bool
    knobs: dict[str, Any]


@dataclass(frozen=True)
class Tuning:
    folder: Path
    technique: str
    trials: list[Trial]
    best: dict[str, Any] | None
    skipped: int  # trials not complete or without both figures
    budget: float  # the tuner's allowed quality degradation, else the project's budget
    problem: str | None = None
    split: str = "test"  # the held-out split that scored the trials (before the option: test)


def _json_object(path: Path, objects: Sequence[str] = ()) -> dict[str, Any] | None:
    """A JSON object file (None when missing); the fields ``objects`` must be objects or null."""
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    for name in objects:
        if not isinstance(data.get(name) or {}, dict):
            raise ValueError(f"{path}: field {name!r} is not an object")
    return data


def load_tuning(folder: Path, budget: float) -> Tuning:
    """A ``bk-bench tune`` folder: optimization_results.json ({"trials": [{number, state, knobs,
    feasible, figures: {wall_speedup, quality_delta, ...}}]}), best_config.json and
    optimization_metadata.json (the tuner's max_degradation replaces ``budget`` here)."""
    if not folder.is_dir():
        raise ValueError(f"tuning folder {folder} does not exist")
    best = _json_object(folder / "best_config.json", ("knobs", "figures"))
    metadata = _json_object(folder / "optimization_metadata.json", ("settings", "setup")) or {}
    settings = metadata.get("settings") or {}
    split = str((metadata.get("setup") or {}).get("quality_split")
                or (best or {}).get("quality_split") or "test")
    name = str(settings.get("technique") or (best or {}).get("technique") or folder.name)
    limit = settings.get("max_degradation", (best or {}).get("max_degradation"))
    budget = budget if limit is None else _number(limit, f"{folder} max_degradation",
                                                  required=True)
    results_path = folder / "optimization_results.json"
    if not results_path.is_file():
        return Tuning(folder, name, [], best, 0, budget, split=split,
                      problem=f"{results_path.name} not found in {folder} "
                              f"(written by `bk-bench tune TECHNIQUE --output {folder}`)")
    data = read_json(results_path)
    raw = data.get("trials") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise ValueError(f"{results_path}: expected {{'trials': [...]}} as bk-bench tune writes")
    trials, skipped = [], 0
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ValueError(f"{results_path}: trial {i} is not an object")
        figures = t.get("figures") or {}
        if t.get("state") != "COMPLETE" or not isinstance(figures, dict):
            skipped += 1  # running, failed or pruned: no measured point to show
            continue
        what = f"{results_path}: trial {t.get('number', i)}"
        number, knobs = t.get("number", i), t.get("knobs") or {}
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(knobs,
                                                                                     dict):
            raise ValueError(f"{what}: expected an integer 'number' and a 'knobs' object")
        speedup = _number(figures.get("wall_speedup"), f"{what} wall_speedup")
        delta = _number(figures.get("quality_delta"), f"{what} quality_delta")
        if speedup is None or delta is None:
            skipped += 1
            continue
        feasible = t.get("feasible")
        trials.append(Trial(number, speedup, delta,
                            feasible if isinstance(feasible, bool) else delta <= budget,
                            dict(knobs)))
    return Tuning(folder, name, trials, best, skipped, budget, split=split)


@dataclass(frozen=True)
class AsvChange:
    benchmark: str
    params: str
    unit: str
    before: float | None
    after: float | None
    threshold: float

    @property
    def ratio(self) -> float | None:
        if self.before is None or self.after is None or not self.before:
            return None
        ratio = self.after / self.before
        return None if math.isnan(ratio) else ratio

    @property
    def status(self) -> str:
        """asv's reading: every rise is worse (asv has no higher-is-better). asv writes null
        for a failed benchmark and NaN for a skipped one."""
        if self.after is None:
            return "new failure" if self.before is not None else "failing"
        if math.isnan(self.after):
            return "skipped"
        if self.before is None or math.isnan(self.before):
            return "new"
        ratio = self.ratio
        if ratio is None:
            return "same"
        if ratio > 1 + self.threshold:
            return "worse"
        if ratio < 1 / (1 + self.threshold):
            return "better"
        return "same"


@dataclass(frozen=True)
class AsvComparison:
    machine: str
    env: str
    before: str
    after: str
    changes: list[AsvChange]


@dataclass(frozen=True)
class AsvHistory:
    """Every commit asv measured on one machine and environment, oldest first, and each
    benchmark's value at each (``Series``)."""

    machine: str
    env: str
    commits: list[str]
    series: list[Series]


@dataclass(frozen=True)
class AsvSummary:
    comparisons: list[AsvComparison] = field(default_factory=list)
    problem: str | None = None
    histories: list[AsvHistory] = field(default_factory=list)


def asv_thresholds(config: Path) -> dict[str, float]:
    """``regressions_thresholds`` of asv.conf.json (a commented JSON file)."""
    if not config.is_file():
        return {}
    from asv import util

    data = util.load_json(str(config), js_comments=True)
    return {str(k): float(v) for k, v in data.get("regressions_thresholds", {}).items()}


def asv_threshold(name: str, thresholds: dict[str, float]) -> float:
    """As asv publish decides: the largest threshold whose regex matches, else 0.05."""
    matching = [t for regex, t in thresholds.items() if re.match(regex, name)]
    return max(matching) if matching else ASV_DEFAULT_THRESHOLD


def _asv_value(value: Any, what: str) -> float | None:
    """A result as asv stores it: a number, NaN (skipped) or null (failed)."""
    if isinstance(value, float) and math.isnan(value):
        return value
    return _number(value, what)


def asv_series(runs: Sequence[Any], units: dict[str, str]) -> list[Series]:
    """Each benchmark's value at each of ``runs`` (asv ``Results``, in order), per parameter
    combination of the newest run that has the benchmark; failed and skipped are None."""
    series = []
    keys = sorted({key for r in runs for key in r.get_all_result_keys()})
    for key in keys:
        params = next(r for r in reversed(runs)
                      if key in r.get_all_result_keys()).get_result_params(key)
        labels = [", ".join(combo) for combo in itertools.product(*params)]
        columns = []
        for r in runs:
            values = (r.get_result_value(key, params) if key in r.get_all_result_keys()
                      else None) or [None] * len(labels)
            columns.append([_asv_value(v, f"asv {r.commit_hash[:8]} {key}") for v in values])
        for i, label in enumerate(labels):
            values = tuple(None if i >= len(c) or c[i] is None or math.isnan(c[i]) else c[i]
                           for c in columns)
            series.append(Series(key, label, units.get(key, ""), values))
    return series


def load_asv(results_dir: Path, config: Path) -> AsvSummary:
    """Per machine and environment: the history of every benchmark, and the last two commits
    compared benchmark by benchmark."""
    if not results_dir.is_dir():
        return AsvSummary(problem=f"no asv results in {results_dir}: run `asv run` or "
                                  f"`asv continuous main HEAD` first")
    try:
        from asv.results import iter_results
    except ImportError:
        return AsvSummary(problem="asv is not installed (pip install -e '.[bench]'); "
                                  f"the asv results in {results_dir} were not read")
    thresholds = asv_thresholds(config)
    units: dict[str, str] = {}
    benchmarks_json = results_dir / "benchmarks.json"
    if benchmarks_json.is_file():
        units = {k: str(v.get("unit", "")) for k, v in read_json(benchmarks_json).items()
                 if isinstance(v, dict)}
    groups: dict[tuple[str, str], list[Any]] = {}
    for res in iter_results(str(results_dir)):
        groups.setdefault((res.params.get("machine", "?"), res.env_name), []).append(res)
    comparisons, histories = [], []
    for (machine, env), runs in sorted(groups.items()):
        runs.sort(key=lambda r: (r.date or 0, r.commit_hash))
        histories.append(AsvHistory(machine, env, [r.commit_hash for r in runs],
                                    asv_series(runs, units)))
        if len(runs) < 2:
            continue
        old, new = runs[-2], runs[-1]
        changes = []
        for key in sorted(new.get_all_result_keys()):
            params = new.get_result_params(key)
            after = new.get_result_value(key, params) or []
            before = (old.get_result_value(key, params) if key in old.get_all_result_keys()
                      else None) or [None] * len(after)
            labels = [", ".join(combo) for combo in itertools.product(*params)]
            for label, b, a in zip(labels, before, after, strict=False):
                changes.append(AsvChange(
                    key, label, units.get(key, ""),
                    _asv_value(b, f"asv {old.commit_hash[:8]} {key}"),
                    _asv_value(a, f"asv {new.commit_hash[:8]} {key}"),
                    asv_threshold(key, thresholds)))
        comparisons.append(AsvComparison(machine, env, old.commit_hash, new.commit_hash, changes))
    if not comparisons:
        return AsvSummary(problem=f"the asv results in {results_dir} hold fewer than two commits "
                                  f"per machine; nothing to compare yet", histories=histories)
    return AsvSummary(comparisons, histories=histories)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend), each PNG written atomically (bench.files).


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def _save(fig: Any, path: Path) -> None:
    try:
        write_atomic(path, figure_writer(fig))
    finally:
        fig.clf()
        _pyplot().close(fig)


def plot_techniques(rows: Sequence[Row], budget: float, path: Path) -> None:
    """Left: wall speedup (IQR error bars) beside FLOPs speedup and 1 / work ratio.
    Right: quality delta with the budget line."""
    import numpy as np

    plt = _pyplot()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    y = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 2.2), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    h = 0.27
    wall = [r.wall_speedup for r in rows]
    err = np.array([[r.wall_speedup - r.wall_q1 if r.wall_q1 is not None else 0.0 for r in rows],
                    [r.wall_q3 - r.wall_speedup if r.wall_q3 is not None else 0.0
                     for r in rows]])
    left.barh(y - h, wall, h, xerr=err, capsize=3, color=palette[0],
              label="wall speedup (measured, IQR)")
    left.barh(y, [r.flops_speedup or 0.0 for r in rows], h, color=palette[1],
              label="FLOPs speedup")
    left.barh(y + h, [1 / r.work_ratio if r.work_ratio else 0.0 for r in rows], h,
              color=palette[2], label="1 / work ratio")
    left.axvline(1.0, color="black", lw=0.8)
    left.set_yticks(y, [r.technique for r in rows])
    left.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no empty margin
    left.set_xlabel("x over the dense model (higher is faster)")
    left.set_title("speed: measured vs counted", pad=28)
    left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8,
                frameon=False)

    deltas = [100 * r.quality_delta if r.quality_delta is not None else 0.0 for r in rows]
    colors = ["#2ca02c" if r.quality_delta is not None and r.quality_delta <= budget
              else "#d62728" for r in rows]
    right.barh(y, deltas, 0.5, color=colors)
    for yi, r in zip(y, rows, strict=True):
        if r.quality_delta is None:
            right.text(0, yi, " n/a", va="center", fontsize=9)
    right.axvline(100 * budget, color="#d62728", ls="--", lw=1.2,
                  label=f"budget +{budget:.0%}")
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("test perplexity change vs dense (%)")
    right.set_title("quality (lower is better)", pad=28)
    right.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(tuning: Tuning, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [t for t in tuning.trials if t.feasible]
    bad = [t for t in tuning.trials if not t.feasible]
    ax.scatter([100 * t.quality_delta for t in ok], [t.speedup for t in ok], color="#1f77b4",
               label="feasible trial", zorder=3)
    ax.scatter([100 * t.quality_delta for t in bad], [t.speedup for t in bad], color="#d62728",
               marker="x", label="infeasible trial", zorder=3)
    points = [(t.speedup, t.quality_delta) for t in tuning.trials]
    front = [tuning.trials[i] for i in pareto_front(points)]
    ax.step([100 * t.quality_delta for t in front], [t.speedup for t in front], where="post",
            color="black", lw=1.2, label="Pareto front")
    ax.axvline(100 * tuning.budget, color="#d62728", ls="--", lw=1.2,
               label=f"allowed +{tuning.budget:.1%}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel(f"{tuning.split} perplexity change vs dense (%)")
    ax.set_ylabel("wall speedup (x)")
    ax.set_title(f"tuning {tuning.technique}: {len(tuning.trials)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


START_WORDS = {"dense": "fine-tuned from dense", "scratch": "trained from scratch"}


def record_start(rec: dict[str, Any]) -> str:
    """Where a record's techniques started training (``Setup.start``); records from before
    the setting existed fine-tuned from the dense model."""
    from bench.baselines import ADDED_SETTINGS

    start = {**ADDED_SETTINGS, **(rec.get("setup") or {})}["start"]
    if start not in START_WORDS:
        raise ValueError(f"record {str(rec.get('commit'))[:10]}: setup start {start!r} is "
                         f"not one of {', '.join(START_WORDS)}")
    return str(start)


def plot_cumulative(records: Sequence[dict[str, Any]], target: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = list(range(len(records)))
    speed = [float(r["cumulative"]["speedup"]) for r in records]
    ax.plot(x, speed, color="#1f77b4", lw=1.5, zorder=2)
    starts = [record_start(r) for r in records]
    for start, marker in (("dense", "o"), ("scratch", "s")):
        counts = [i for i, r in enumerate(records)
                  if starts[i] == start and r["cumulative"]["counts"]]
        misses = [i for i, r in enumerate(records)
                  if starts[i] == start and not r["cumulative"]["counts"]]
        trained = START_WORDS[start]
        if counts:
            ax.scatter(counts, [speed[i] for i in counts], color="#2ca02c", s=50, zorder=3,
                       marker=marker, label=f"{trained}, within the quality budget (counts)")
        if misses:
            ax.scatter(misses, [speed[i] for i in misses], facecolors="white",
                       edgecolors="#d62728", s=50, lw=1.5, zorder=3, marker=marker,
                       label=f"{trained}, outside the budget (does not count)")
    ax.axhline(target, color="black", ls="--", lw=1.2, label=f"target {target:g}x")
    ax.set_yscale("log")
    ax.set_ylim(min([*speed, 1.0]) / 1.3, max([*speed, target]) * 1.3)
    ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 50, 100) if ax.get_ylim()[0] <= t
             <= ax.get_ylim()[1]]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_xticks(x, [f"{r['commit'][:8]}\n{str(r.get('date', ''))[:10]}" for r in records],
                  fontsize=8)
    ax.set_xlim(-0.5, max(len(records) - 0.5, 0.5))
    ax.set_ylabel("cumulative wall speedup")
    ax.set_title("cumulative speedup by commit (measured, never multiplied)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# HTML


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | None, pattern: str = "{:.2f}x") -> str:
    return "n/a" if value is None or math.isnan(value) else pattern.format(value)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], classes: Iterable[str] = (),
          notes: bool = False) -> str:
    """``rows`` cells are HTML already (escaped by the caller); ``notes``: the last column is
    free text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f'<tr class="{esc(c)}">' + "".join(f"<td>{cell}</td>" for cell in row)
                   + "</tr>" for row, c in itertools.zip_longest(rows, classes, fillvalue=""))
    kind = " class=notes" if notes else ""
    return (f'<div class=wide><table{kind}><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f"</table></div>")


def figure(src: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{esc(src)}" alt="{esc(alt)}"><figcaption>{esc(caption)}'
            f"</figcaption></figure>")


def _gap_note(row: Row) -> str:
    if gap(row) is None:
        return ""
    if gap(row) > GAP_FLAG:
        return "counted savings do not reach the clock"
    if gap(row) < 1 / GAP_FLAG:
        return "clock beats the counted work: check the work accounting"
    return ""


def section_techniques(results: RunResults | None, budget: float, out: Path) -> str:
    if results is None:
        return ("<p class=missing>No results: run <code>bk-bench run</code> (writes "
                "<code>runs/results.json</code>), then pass it with <code>--results</code>.</p>")
    if not results.rows:
        return f"<p class=missing>{esc(results.path)} holds no technique.</p>"
    plot_techniques(results.rows, budget, out / "techniques.png")
    header = ["technique", "knobs", "wall speedup", "IQR", "FLOPs speedup", "work ratio",
              "FLOPs / wall", "ppl delta", "counts?", "per-token stats (mean)", "notes"]
    cells, classes = [], []
    for r in results.rows:
        notes = [n for n in (_gap_note(r), r.noise_warning) if n]
        iqr = ("n/a" if r.wall_q1 is None or r.wall_q3 is None
               else f"{r.wall_q1:.2f} - {r.wall_q3:.2f}")
        counts = {True: "yes", False: "no", None: "n/a"}[r.counts]
        cells.append([f"<b>{esc(r.technique)}</b>", esc(knobs_text(r.knobs)),
                      fmt(r.wall_speedup), iqr, fmt(r.flops_speedup),
                      fmt(r.work_ratio, "{:.3f}"), fmt(gap(r), "{:.2f}"),
                      fmt(r.quality_delta, "{:+.2%}"), counts,
                      "<br>".join(f"{esc(k.removeprefix('mean_'))} {v:.3f}"
                                  for k, v in sorted(r.stats.items())),
                      esc("; ".join(notes))])
        classes.append("flag" if notes else ("miss" if r.counts is False else ""))
    rec = results.record
    setup = ", ".join(f"{k}={v}" for k, v in (rec.get("setup") or {}).items())
    meta = [f"commit {str(rec['commit'])[:10]}" if rec.get("commit") else "",
            f"date {rec['date']}" if rec.get("date") else "",
            str((rec.get("machine") or {}).get("cpu", "")), f"setup {setup}" if setup else ""]
    about = "; ".join(m for m in meta if m)
    return "".join([
        f"<p class=meta>From <a href=\"{esc(_rel(results.path, out))}\">"
        f"{esc(results.path.name)}</a>{esc(': ' + about if about else '')}</p>",
        figure("techniques.png",
               "Per technique: bars of wall speedup with interquartile error bars, FLOPs speedup "
               "and inverse work ratio; beside them, the test perplexity change against the "
               f"+{budget:.0%} budget line.",
               "Wall speedup (measured, median of paired rounds, IQR as error bars) next to the "
               "FLOPs speedup and 1 / work ratio (both counted); right: quality change."),
        "<div class=callout><b>Honesty check.</b> The wall speedup is timed; the FLOPs speedup and "
        "the work ratio are counted from the work the model reports it executed. A technique "
        "that skips work for real shows all three together. When the FLOPs speedup is far above "
        "the wall speedup, the skipped work is not turning into time (gathers, small matrices, "
        "Python overhead); when the wall speedup is far above it, the work accounting or the "
        f"dense path is suspect. Rows are flagged when the two differ by more than "
        f"{GAP_FLAG:g}x. The dense row is an A/A comparison: its spread is the noise.</div>",
        table(header, cells, classes, notes=True),
        _quality_note(rec),
    ])


def realisation_sources(results: RunResults | None, records: Sequence[dict[str, Any]]
                        ) -> list[tuple[str, str, list[Row]]]:
    """(scale, where from, rows) per model scale: this run's rows at its scale, the latest
    schema-2 record's at every other scale, in the order tiny, small, base, others."""
    from bench.baselines import record_rows, record_scale
    from bk.model import SCALES

    found: dict[str, tuple[str, list[Row]]] = {}
    for rec in records:
        if rec.get("schema") == 2:
            where = f"record {str(rec.get('commit', ''))[:10]}"
            found[record_scale(rec)] = (where, list(record_rows(rec, where).values()))
    if results is not None and results.rows:
        found[results.rows[0].scale] = ("this run", results.rows)
    order = [*SCALES, *sorted(set(found) - set(SCALES))]
    return [(scale, *found[scale]) for scale in order if scale in found]


def limited_by(row: Row) -> str:
    """Which of the three gaps is widest: the idea (little work skipped), the implementation
    (overhead between ideal and ceiling) or the decisions (between ceiling and realised)."""
    ideal, overhead, decisions = row.ideal, row.overhead("uniform"), row.decision_cost("uniform")
    if ideal is None or overhead is None or decisions is None:
        return "n/a"
    losses = {"idea: little work skipped": 1 - 1 / ideal, "implementation overhead": overhead,
              "decision cost": decisions}
    return max(losses, key=lambda k: losses[k])


def plot_realisation(rows: Sequence[Row], scale: str, path: Path) -> None:
    """Per technique: realised wall speedup, its ceilings (uniform and per-token forcing) and
    the ideal, on one log axis."""
    import numpy as np

    plt = _pyplot()
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 2.0))
    series = [("realised (wall)", [r.wall_speedup for r in rows], "#1f77b4", "o"),
              ("ceiling, uniform", [r.ceiling("uniform") for r in rows], "#2ca02c", "s"),
              ("ceiling, per token", [r.ceiling("per_token") for r in rows], "#9467bd", "D"),
              ("ideal (1 / work)", [r.ideal for r in rows], "#7f7f7f", "|")]
    for label, values, color, marker in series:
        shown = [(yi, v) for yi, v in zip(y, values, strict=True) if v is not None]
        if shown:
            ax.scatter([v for _, v in shown], [yi for yi, _ in shown], color=color,
                       marker=marker, s=60 if marker != "|" else 300, label=label, zorder=3)
    for yi, r in zip(y, rows, strict=True):
        ends = [v for v in (r.wall_speedup, r.ceiling("uniform"), r.ideal) if v is not None]
        ax.plot([min(ends), max(ends)], [yi, yi], color="#cccccc", lw=3, zorder=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_minor_formatter(lambda v, _: f"{v:g}x" if f"{v:g}"[0] in "2358" else "")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y, [r.technique for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("x over the dense model (log scale; right of 1 is faster)")
    ax.set_title(f"scale {scale}: realised, ceiling and ideal", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)


def section_realisation(results: RunResults | None, records: Sequence[dict[str, Any]],
                        out: Path) -> str:
    """Realised speedup, ceiling and ideal per technique, one figure and table per scale."""
    sources = realisation_sources(results, records)
    if not sources:
        return ("<p class=missing>No measured rows: <code>bk-bench run</code> (any "
                "<code>--scale</code>) measures ceilings beside every technique.</p>")
    parts = ["<p>For each technique the gap from the ideal (1 / the work it ran) down to the "
             "realised wall speedup splits in two: <b>implementation overhead</b>, 1 - ceiling / "
             "ideal, where the ceiling is the same skip pattern timed with its decisions given "
             "for free (forced at the keep rate that matches the work the trained technique "
             "ran); and <b>decision cost</b>, 1 - realised / ceiling, what deciding costs "
             "(predictors, heads, heterogeneous choices). A technique whose ideal is near 1 is "
             "limited by its idea at these settings.</p>"]
    header = ["technique", "realised", "ceiling (uniform)", "ceiling (per token)", "ideal",
              "overhead", "decision cost", "widest gap"]
    for scale, where, rows in sources:
        rows = [r for r in rows if r.technique != "dense"]
        png = f"realisation-{scale}.png"
        plot_realisation(rows, scale, out / png)
        cells = [[f"<b>{esc(r.technique)}</b>", fmt(r.wall_speedup), fmt(r.ceiling("uniform")),
                  fmt(r.ceiling("per_token")), fmt(r.ideal),
                  fmt(r.overhead("uniform"), "{:.0%}"),
                  fmt(r.decision_cost("uniform"), "{:.0%}"), esc(limited_by(r))] for r in rows]
        parts += [f"<h3>scale {esc(scale)} <small>({esc(where)})</small></h3>",
                  figure(png, f"Dot plot per technique at scale {scale}: realised wall speedup, "
                              "ceilings under uniform and per-token forcing, and the ideal, on "
                              "a log axis.",
                         "Grey bars span realised to ideal; the further the realised dot sits "
                         "left of the ideal mark, the more of the skipped work never reached "
                         "the clock."),
                  table(header, cells)]
    return "".join(parts)


def section_axes(results: RunResults | None, records: Sequence[dict[str, Any]]) -> str:
    """Per scale (this run's record at its scale, else the latest record that has them), each
    composed technique with every axis on and with each axis off in turn."""
    from bench.baselines import record_axes, record_rows, record_scale
    from bk.model import SCALES

    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for rec in records:
        if rec.get("schema") == 2 and rec.get("axes"):
            found[record_scale(rec)] = (f"record {str(rec.get('commit', ''))[:10]}", rec)
    if results is not None and results.record.get("axes"):
        found[(results.record.get("setup") or {}).get("scale", "tiny")] = ("this run",
                                                                           results.record)
    if not found:
        return ("<p class=missing>No run measured a composed technique with its axes off: "
                "<code>bk-bench run</code> does so for every technique that declares axes "
                "(<code>combined</code>).</p>")
    parts = ["<p>A composed technique (one forward pass over several ways of cutting work) is "
             "measured again with each axis switched off, the others at their defaults. What "
             "an axis adds with the others on: its <b>speed</b>, the speedup with every axis "
             "over the speedup without it, and its <b>quality cost</b>, the difference of the "
             "perplexity deltas. Axes do not multiply: each figure is measured.</p>"]
    header = ["axes", "wall speedup", "ppl delta", "in budget?", "the axis: speed",
              "the axis: quality cost"]
    for scale in [*SCALES, *sorted(set(found) - set(SCALES))]:
        if scale not in found:
            continue
        where, rec = found[scale]
        full_rows = record_rows(rec, where)
        for name, by_axis in record_axes(rec, where).items():
            full = full_rows[name]
            cells = [["<b>all on</b>", fmt(full.wall_speedup), fmt(full.quality_delta, "{:+.1%}"),
                      "yes" if full.counts else "no", "", ""]]
            for axis, row in by_axis.items():
                cost = (None if full.quality_delta is None or row.quality_delta is None
                        else full.quality_delta - row.quality_delta)
                cells.append([f"without {esc(axis)}", fmt(row.wall_speedup),
                              fmt(row.quality_delta, "{:+.1%}"), "yes" if row.counts else "no",
                              fmt(full.wall_speedup / row.wall_speedup),
                              fmt(None if cost is None else 100 * cost, "{:+.1f} points")])
            parts += [f"<h3>{esc(name)} at scale {esc(scale)} <small>({esc(where)})</small></h3>",
                      table(header, cells)]
    return "".join(parts)


def _quality_note(record: dict[str, Any]) -> str:
    quality = record.get("quality") or {}
    if "dense_test_bits" not in quality:
        return ""
    return (f"<p>dense test: {quality['dense_test_bits']:.3f} bits/char (perplexity "
            f"{quality.get('dense_test_perplexity', float('nan')):.2f}); unigram "
            f"{quality.get('unigram_test_bits', float('nan')):.3f}, bigram "
            f"{quality.get('bigram_test_bits', float('nan')):.3f} bits/char. The cumulative "
            "speedup of this run is the headline at the top.</p>")


def _best_config(best: dict[str, Any]) -> str:
    if not best.get("knobs"):
        return f"<p>best_config.json: no configuration ({esc(best.get('reason', 'none'))}).</p>"
    knobs = ", ".join(f"{k}={v}" for k, v in best["knobs"].items())
    figures = best.get("figures") or best
    measured = [f"{label} {fmt(value, pattern)}" for label, value, pattern in (
        ("wall speedup", figures.get("wall_speedup"), "{:.2f}x"),
        ("ppl delta", figures.get("quality_delta"), "{:+.2%}"))
        if isinstance(value, int | float)]
    return f"<p>Best configuration (best_config.json): {esc(', '.join([knobs, *measured]))}.</p>"


def section_tuning(tunings: Sequence[Tuning], out: Path) -> str:
    if not tunings:
        return ("<p class=missing>No tuning folder given: run <code>bk-bench tune TECHNIQUE "
                "--output DIR</code>, then pass <code>--tuning DIR</code>.</p>")
    parts = []
    for i, t in enumerate(tunings):
        parts.append(f"<h3>{esc(t.technique)} <small>({esc(t.folder)})</small></h3>")
        if t.problem:
            parts.append(f"<p class=missing>{esc(t.problem)}</p>")
        elif not t.trials:
            parts.append(f"<p class=missing>No complete trial with a speedup and a quality delta "
                         f"yet ({t.skipped} other trials).</p>")
        else:
            png = f"pareto-{i}.png"
            plot_pareto(t, out / png)
            parts.append(figure(png, f"Scatter of wall speedup against perplexity change for "
                                     f"{len(t.trials)} {t.technique} trials with the Pareto "
                                     f"front and the +{t.budget:.1%} allowed-degradation line.",
                                f"{len(t.trials)} complete trials, {t.skipped} not shown "
                                f"(incomplete or without figures). Quality on the {t.split} "
                                f"split" + (": the knobs were chosen on it; bk-bench tune "
                                            "--validate measures them on the test split."
                                            if t.split != "test" else ".")))
            front = [t.trials[j] for j in pareto_front([(x.speedup, x.quality_delta)
                                                         for x in t.trials])]
            parts.append(table(
                ["trial", "knobs", "wall speedup", "ppl delta", "feasible"],
                ([str(x.number), esc(", ".join(f"{k}={v}" for k, v in x.knobs.items())),
                  fmt(x.speedup), fmt(x.quality_delta, "{:+.2%}"), "yes" if x.feasible else "no"]
                 for x in front)))
        if t.best is not None:
            parts.append(_best_config(t.best))
    return "".join(parts)


def section_cumulative(records: Sequence[dict[str, Any]], target: Target, out: Path) -> str:
    """One history per model scale and processor: a comparison never mixes scales, nor
    processors (the same model's ratios differ from one to another)."""
    from bench.baselines import record_scale

    if not records:
        return ("<p class=missing>No baseline record yet: <code>bk-bench baseline record</code> "
                "adds one per commit to <code>baselines/records/</code>.</p>")

    def cpu(rec: dict[str, Any]) -> str:
        return str((rec.get("machine") or {}).get("cpu") or "an unnamed processor")

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((record_scale(rec), cpu(rec)), []).append(rec)
    processors = collections.Counter(scale for scale, _ in groups)
    parts = []
    for (scale, name), group in groups.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        png = f"cumulative-{scale}{'' if processors[scale] == 1 else '-' + slug}.png"
        parts.append(f"<h3>scale {esc(scale)}, {esc(name)}</h3>"
                     + _scale_history(group, target, out, png))
    return "".join(parts)


def _scale_history(records: Sequence[dict[str, Any]], target: Target, out: Path,
                   png: str) -> str:
    for r in records:
        _number(r["cumulative"]["speedup"], f"record {r['commit'][:10]} cumulative speedup",
                required=True)
    plot_cumulative(records, target.cumulative_speedup, out / png)
    rows = [[esc(str(r["commit"])[:10]), esc(str(r.get("date", ""))),
             fmt(r["cumulative"]["speedup"]),
             esc(r["cumulative"].get("source", "")), START_WORDS[record_start(r)],
             "yes" if r["cumulative"]["counts"] else "no"] for r in records]
    latest = console.headline(records[-1]["cumulative"], target.cumulative_speedup,
                              target.quality_budget)
    return "".join([
        f"<p>Latest record ({esc(str(records[-1]['commit'])[:10])}): <b>{esc(latest)}</b>.</p>",
        figure(png,
               f"Line plot of the cumulative wall speedup over {len(records)} recorded commits "
               f"with the {target.cumulative_speedup:g}x target line; filled markers count, "
               "hollow ones are outside the quality budget; circles fine-tuned their "
               "techniques from the dense model, squares trained them from scratch.",
               "Each point is a measured speedup (the combined technique, or the best single "
               "technique within the budget); speedups are never multiplied on paper."),
        table(["commit", "date", "cumulative speedup", "source", "techniques", "counts?"],
              rows,
              ["" if r["cumulative"]["counts"] else "miss" for r in records]),
    ])


def speed_points(rows: Sequence[Row], target: Target) -> list[SpeedPoint]:
    return [SpeedPoint(r.technique, r.wall_speedup, r.wall_q1, r.wall_q3, r.quality_delta,
                       None if r.quality_delta is None else target.counts(r.quality_delta),
                       bool(r.noise_warning)) for r in rows]


def section_summary(results: RunResults | None, records: Sequence[dict[str, Any]],
                    target: Target, noise_limit: float, out: Path) -> str:
    """The page's opening: the headline, the speed-against-quality figure and how to read it."""
    source = results.record if results is not None and results.record.get("cumulative") else (
        records[-1] if records else None)
    budget = target.quality_budget
    parts = []
    if source is not None:
        label = ("this run" if results is not None and source is results.record
                 else f"the latest record, {str(source.get('commit', ''))[:10]}")
        rows = results.rows if results is not None and source is results.record else []
        chosen = source["cumulative"].get("source")
        noisy = any(r.noise_warning for r in rows if r.technique == chosen)
        text = console.headline(source["cumulative"], target.cumulative_speedup, budget, noisy)
        parts.append(f"<p class=headline>{esc(text)} <small>({esc(label)})</small></p>")
    if results is None or not results.rows:
        parts.append("<p class=missing>No run results: <code>bk-bench run</code> writes them "
                     "(and this page, in <code>runs/report/</code>).</p>")
        return "".join(parts)
    setup = results.record.get("setup") or {}
    write_atomic(out / "speed_quality.png",
                 speed_quality(speed_points(results.rows, target), budget,
                               target.cumulative_speedup, console.setup_title(setup)))
    noisy = sum(bool(r.noise_warning) for r in results.rows)
    over = [r.technique for r in results.rows
            if r.quality_delta is not None and not target.counts(r.quality_delta)]
    parts.append(figure(
        "speed_quality.png",
        f"Scatter of wall speedup (log scale, interquartile bars) against test perplexity change "
        f"for {len(results.rows)} techniques at {console.setup_title(setup)}, with the "
        f"+{budget:.0%} quality budget, the {target.cumulative_speedup:g}x target and the goal "
        "region; techniques over the budget are red crosses, noisy ones hollow.",
        "Up is faster, left is better quality. Only techniques left of the dashed red budget "
        "line count toward the target; the shaded green corner is the goal."))
    reading = [
        f"<b>Wall speedup</b> is measured: dense time over technique time, paired in one process "
        f"on one thread, the median of the per-round ratios; the bars are its interquartile range "
        f"(IQR). {noisy} of {len(results.rows)} rows are <b>noisy</b> (IQR above "
        f"{noise_limit:.0%} of the median): read those as ranges, not figures.",
        f"<b>Quality</b> is the test perplexity change against the dense model trained as long; "
        f"the budget is +{budget:.0%}. "
        + (f"Over the budget, so not counted however fast: {esc(', '.join(over))}."
           if over else "Every technique with a quality figure is within it."),
        "The dense row is the dense model against itself (A/A): its spread is the noise floor.",
    ]
    parts.append("<ul>" + "".join(f"<li>{r}</li>" for r in reading) + "</ul>")
    return "".join(parts)


# Per-token statistics: what each means and its largest possible value (None: the largest seen).
STAT_WORDS = {"layers_per_token": "layers run", "exit_layer": "exit layer",
              "experts_per_token": "experts used (mean over layers)",
              "sparsity": "share of layers skipped", "length": "computed length of its window"}
SHADES = 10  # background shades s0 (no work) .. s10 (the most)
PRIMARY = ("layers_per_token", "exit_layer", "experts_per_token", "sparsity")


def stat_words(stat: str) -> str:
    if stat.startswith("tier_"):
        return f"share of layers routed by the {stat.removeprefix('tier_')} tier"
    return STAT_WORDS.get(stat, stat.replace("_", " "))


def stat_top(stat: str, view: TokenView) -> float:
    """The value shaded darkest: the most a token can get where that is known."""
    if stat in ("layers_per_token", "exit_layer"):
        return float(view.n_layers)
    if stat == "length":
        return float(view.window)
    if stat == "sparsity" or stat.startswith("tier_"):
        return 1.0
    seen = [v for stats in view.techniques.values() for v in stats.get(stat, [])]
    return max([1e-9, *seen])


def shade_css() -> str:
    """White to dark blue in SHADES + 1 steps; light text on the dark half."""
    rules = []
    for i in range(SHADES + 1):
        t = i / SHADES
        rgb = [round(255 + (end - 255) * t) for end in (8, 48, 107)]
        colour = "#{:02x}{:02x}{:02x}".format(*rgb)
        rules.append(f".s{i}{{background:{colour}" + (";color:#fff}" if t > 0.55 else "}"))
    return "".join(rules)


def shaded_passage(view: TokenView, stat: str, values: Sequence[float]) -> str:
    """The passage as spans, each run of tokens with equal values in one span whose class is its
    shade and whose title is the value; a new window starts with a marked span."""
    top = stat_top(stat, view)
    sep = "" if view.level == "char" else " "
    spans, start = [], 0
    for i in range(1, len(values) + 1):
        if i < len(values) and values[i] == values[start] and i % view.window:
            continue
        text = sep.join(view.tokens[start:i]).replace("\n", "\u21b5\n")
        level = round(SHADES * min(max(values[start] / top, 0.0), 1.0))
        window = " w" if start and start % view.window == 0 else ""
        spans.append(f'<span class="s{level}{window}" title="{esc(stat_words(stat))} '
                     f'{values[start]:.3g}">{esc(text)}</span>')
        start = i
    return f"<div class=tokens>{sep.join(spans)}</div>"


def _ramp(stat: str, view: TokenView) -> str:
    top = stat_top(stat, view)
    cells = "".join(f'<span class="s{i}">&nbsp;{top * i / SHADES:.3g}&nbsp;</span>'
                    for i in range(0, SHADES + 1, 2))
    return f"<span class=ramp>{esc(stat_words(stat))}: {cells}</span>"


def section_tokens(view: TokenView | None, order: Sequence[str]) -> str:
    if view is None:
        return ("<p class=missing>No per-token statistics: <code>bk-bench run</code> writes "
                "<code>tokens.json</code> beside <code>results.json</code>.</p>")
    windows = math.ceil(len(view.tokens) / view.window)
    parts = [f"<p>The first {len(view.tokens)} tokens of the timed test text ({windows} windows "
             f"of {view.window}; each window starts from a fresh state, as it is timed, and a new "
             "one is marked by a pink bar). Each token is shaded by the work it received in each "
             "technique's model: white is none, dark is the most it can get (all "
             f"{view.n_layers} layers for layers run); hover a token for its value. Constant "
             "shading means the technique decides per sequence or not at all.</p>"]
    names = [n for n in order if n in view.techniques]
    names += [n for n in view.techniques if n not in names]
    passages = []
    for name in names:
        stats = view.techniques[name]
        if not stats:
            continue
        varying = [s for s in PRIMARY if s in stats and len(set(stats[s])) > 1]
        primary = (varying or [s for s in PRIMARY if s in stats] or sorted(stats))[0]
        values = stats[primary]
        block = [f"<h3>{esc(name)} <small>{esc(stat_words(primary))}: mean "
                 f"{sum(values) / len(values):.2f}, min {min(values):.3g}, max "
                 f"{max(values):.3g}</small></h3>{_ramp(primary, view)}"
                 f"{shaded_passage(view, primary, values)}"]
        for stat in sorted(stats):
            if stat != primary:
                block.append(f"<details><summary>{esc(name)}: {esc(stat_words(stat))}</summary>"
                             f"{_ramp(stat, view)}{shaded_passage(view, stat, stats[stat])}"
                             "</details>")
        passages.append(f"<div>{''.join(block)}</div>")
    return "".join(parts) + f"<div class=passages>{''.join(passages)}</div>"


def asv_meaning() -> str:
    """What asv's figures measure, against the records (from the gate's own settings)."""
    from bench import gate

    return (
        "<div class=callout><b>Two figures, two questions.</b> asv's <code>bench_techniques"
        "</code> ratios (<code>track_time_ratio</code>: technique time over dense time, lower is "
        f"faster) come from models trained for only {gate.STEPS} dense steps at each commit, "
        f"timed on {gate.WORKLOAD_BATCHES} test batches, without quality: they exist to catch a "
        "commit that makes the code slower, and the CI gate fails on them (factor and passes in "
        "<code>baselines/gate.json</code>). A technique's decisions depend on its training, so "
        "these ratios are not its speedup. The authoritative figures are the records of "
        "<code>bk-bench run</code> / <code>bk-bench baseline record</code> (the techniques "
        "section and the cumulative history above): fully trained models, the whole test "
        "split, quality against the budget. The asv <code>track_speedup</code> is 1 / ratio, "
        "ungated.</div>")


def section_asv_history(summary: AsvSummary, out: Path) -> str:
    """asv's per-commit series as static plots and tables (no scripts, works offline)."""
    parts = []
    for i, h in enumerate(summary.histories):
        shown = h.commits[-6:]
        parts.append(f"<h3>History: {esc(h.machine)} <small>{esc(h.env)}, {len(h.commits)} "
                     f"commits</small></h3>")
        suites = list(dict.fromkeys(s.benchmark.split(".", 1)[0] for s in h.series))
        for suite in suites:
            series = [s for s in h.series if s.benchmark.split(".", 1)[0] == suite]
            png = f"asv-{i}-{suite}.png"
            write_atomic(out / png, asv_history(h.commits, series,
                                                f"{suite}: by commit, oldest first"))
            parts.append(figure(png, f"Line plots of the {len(series)} {suite} benchmark values "
                                     f"over {len(h.commits)} commits, one panel per benchmark.",
                                f"{suite}: each benchmark by commit (a gap: failed or skipped)."))
            header = ["benchmark", "parameters", "unit", *(c[:8] for c in shown)]
            rows = [[esc(s.benchmark), esc(s.params), esc(s.unit),
                     *(fmt(v, "{:.4g}") for v in s.values[-len(shown):])] for s in series]
            parts.append(f"<details><summary>{esc(suite)}: the values of the last {len(shown)} "
                         f"commits</summary>{table(header, rows)}</details>")
    return "".join(parts)


def section_asv(summary: AsvSummary, asv_html: Path, out: Path) -> str:
    index = asv_html / "index.html"
    if index.is_file():
        parts = [f'<p>asv\'s own pages: <a href="{esc(_rel(index, out))}">{esc(index)}</a> '
                 "(serve them over HTTP, e.g. <code>asv preview</code>: they load their data "
                 "with scripts, which browsers block on <code>file://</code>).</p>"]
        hosts = external_hosts(index.read_text(encoding="utf-8", errors="replace"))
        if hosts:
            parts.append(f"<p class=missing>asv's pages load scripts and styles from "
                         f"{esc(', '.join(hosts))}: they need a network connection, unlike "
                         "this page.</p>")
    else:
        parts = [f"<p class=missing>asv's HTML is not published at {esc(asv_html)}: run "
                 "<code>asv publish</code> (writes it from the results), then "
                 "<code>asv preview</code> to browse it; the history below needs neither.</p>"]
    parts.insert(0, asv_meaning())
    if summary.problem:
        parts.append(f"<p class=missing>{esc(summary.problem)}</p>")
    for c in summary.comparisons:
        counts = {s: sum(ch.status == s for ch in c.changes)
                  for s in ("worse", "better", "same", "new", "new failure", "failing", "skipped")}
        tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        parts.append(f"<h3>Last two commits: {esc(c.machine)} <small>{esc(c.env)}</small></h3>"
                     f"<p>{esc(c.before[:8])} &rarr; {esc(c.after[:8])}: {esc(tally)}. A ratio "
                     "is new / old, judged against the threshold asv publish would use "
                     "(asv.conf.json regressions_thresholds); asv reads every rise as worse (it "
                     "has no higher-is-better), so gated benchmarks track lower-is-better "
                     "quantities. This compares the last two commits only; asv's own pages "
                     "detect steps over the whole history.</p>")
        order = {"new failure": 0, "worse": 1, "better": 2, "failing": 3, "new": 4, "skipped": 5,
                 "same": 6}
        changes = sorted(c.changes, key=lambda ch: (order[ch.status], ch.benchmark, ch.params))
        rows = [[esc(ch.benchmark), esc(ch.params), fmt(ch.before, "{:.4g}"),
                 fmt(ch.after, "{:.4g}"), fmt(ch.ratio, "{:.3f}"), f"{ch.threshold:.0%}",
                 esc(ch.status), esc(ch.unit)] for ch in changes]
        header = ["benchmark", "parameters", "before", "after", "ratio", "threshold", "status",
                  "unit"]
        flagged = [i for i, ch in enumerate(changes) if ch.status not in ("same", "skipped")]
        classes = ["flag" if ch.status in ("worse", "new failure") else "" for ch in changes]
        parts.append(table(header, [rows[i] for i in flagged], [classes[i] for i in flagged])
                     if flagged else "<p>No benchmark moved beyond its threshold.</p>")
        parts.append(f"<details><summary>all {len(rows)} results</summary>"
                     f"{table(header, rows, classes)}</details>")
    parts.append(section_asv_history(summary, out))
    return "".join(parts)


def external_hosts(page: str) -> list[str]:
    """Hosts a page loads scripts or stylesheets from."""
    tags = re.findall(r"<(?:script|link)\b[^>]*>", page, flags=re.IGNORECASE)
    urls = [m for tag in tags for m in re.findall(r'(?:src|href)="(https?://[^"/]+)', tag)
            if not re.search(r'rel="(?:alternate|canonical)"', tag)]
    return sorted({u.split("://", 1)[1] for u in urls})


def _rel(path: Path, out: Path) -> str:
    """A relative link to ``path``; a published result file (a symlink into its set) is linked
    by its public name, which outlives the set it points at now."""
    path = Path(path).parent.resolve() / Path(path).name
    return Path(os.path.relpath(path, out.resolve())).as_posix()


STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1400px;padding:0 24px 48px;color:#222}
h1{margin:24px 0 4px}h2{margin-top:40px;border-bottom:2px solid #ddd;padding-bottom:4px}
nav a{margin-right:16px}small{color:#666;font-weight:normal}
figure{margin:16px 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
table{border-collapse:collapse;margin:12px 0;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:right;vertical-align:top}
td{white-space:nowrap}td:nth-child(-n+2){white-space:normal}
table.notes td:last-child{text-align:left;white-space:normal;min-width:12em}
table.notes th:last-child{text-align:left}
.wide{overflow-x:auto}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
th{background:#f5f5f5}tr.flag td{background:#fff4e0}tr.miss td{color:#a33}
.callout{background:#eef5fc;border-left:4px solid #1f77b4;padding:8px 12px;margin:12px 0}
.missing{color:#666;font-style:italic}.meta{color:#555;font-size:13px}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
.headline{font-size:19px;font-weight:600;margin:16px 0}
.passages{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:0 24px}
.tokens{font:12px/1.7 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
border:1px solid #ddd;padding:8px}
.tokens .w{border-left:3px solid #e377c2}
.ramp{font-size:12px;color:#555}.ramp span{font:11px ui-monospace,monospace}
details{margin:6px 0}summary{cursor:pointer;color:#1f5f9f}
""" + shade_css()


@dataclass(frozen=True)
class Inputs:
    results: Path | None
    baselines: Path | None  # None: the repository's baselines/
    tunings: tuple[Path, ...]
    asv_results: Path
    asv_html: Path
    asv_config: Path

    @classmethod
    def defaults(cls, results: Path | None) -> Inputs:
        """The report over ``results`` with every other input where bk-bench puts it."""
        return cls(results, None, (), ASV_RESULTS, ASV_HTML, ASV_CONFIG)


def build(inputs: Inputs, out: Path) -> Path:
    """Write ``out/index.html`` and its PNGs; returns the page's path."""
    from bench.baselines import BASELINES, Target, history
    from bench.measure import NOISE_LIMIT

    out.mkdir(parents=True, exist_ok=True)
    root = inputs.baselines or BASELINES
    target = Target.load(root) if (root / "target.json").is_file() else Target.load()
    results = load_results(inputs.results) if inputs.results is not None else None
    tokens = load_tokens(inputs.results.parent / "tokens.json") if inputs.results else None
    records = history(root)
    tunings = [load_tuning(folder, target.quality_budget) for folder in inputs.tunings]
    summary = load_asv(inputs.asv_results, inputs.asv_config)
    order = [r.technique for r in results.rows] if results is not None else []
    sections: list[tuple[str, str, Callable[[], str]]] = [
        ("summary", "At a glance",
         lambda: section_summary(results, records, target, NOISE_LIMIT, out)),
        ("techniques", "Techniques",
         lambda: section_techniques(results, target.quality_budget, out)),
        ("realisation", "Realised, ceiling and ideal",
         lambda: section_realisation(results, records, out)),
        ("axes", "Each axis's contribution", lambda: section_axes(results, records)),
        ("tokens", "Where the compute goes", lambda: section_tokens(tokens, order)),
        ("tuning", "Tuning: Pareto fronts",
         lambda: section_tuning(tunings, out)),
        ("cumulative", "Cumulative speedup by commit",
         lambda: section_cumulative(records, target, out)),
        ("asv", "asv: per-commit benchmarks",
         lambda: section_asv(summary, inputs.asv_html, out)),
    ]
    body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{render()}</section>'
                   for key, title, render in sections)
    nav = "".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in sections)
    scale = ((results.record.get("setup") or {}).get("scale", "tiny") if results is not None
             else None)
    page = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        '<link rel=icon href="data:,">'  # no favicon request, so no 404 in the console
        f"<title>bk-bench report</title><style>{STYLE}</style></head><body>"
        "<h1>bk-bench report" + (f" <small>scale {esc(scale)}</small>" if scale else "")
        + f"</h1><p class=meta>Target: {target.cumulative_speedup:g}x "
        f"cumulative wall speedup within +{target.quality_budget:.0%} test perplexity. "
        f"Speedups are paired, in-process, one-thread timing ratios.</p><nav>{nav}</nav>"
        f"{body}</body></html>\n")
    index = out / "index.html"
    write_atomic(index, page)
    return index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=None,
                        help="results.json of `bk-bench run` (default: runs/results.json if "
                             "present); its tokens.json beside it is read too")
    parser.add_argument("--baselines", type=Path,
                        help="folder with target.json and records/ (default: the repository's "
                             "baselines/)")
    parser.add_argument("--tuning", type=Path, nargs="+", action="extend", default=[],
                        metavar="DIR", help="tuner output folders (bk-bench tune --output)")
    parser.add_argument("--asv-results", type=Path, default=ASV_RESULTS)
    parser.add_argument("--asv-html", type=Path, default=ASV_HTML)
    parser.add_argument("--asv-config", type=Path, default=ASV_CONFIG,
                        help="for its regressions_thresholds")
    parser.add_argument("--output", type=Path, default=Path("report"))


def run(args: argparse.Namespace) -> int:
    results = args.results
    if results is None:
        default = Path("runs/results.json")
        results = default if default.is_file() else None
    elif not results.is_file():
        raise ValueError(f"--results {results} does not exist (run `bk-bench run` first)")
    index = build(Inputs(results, args.baselines, tuple(args.tuning), args.asv_results,
                         args.asv_html, args.asv_config), args.output)
    print(f"report: {index}")
    return 0
