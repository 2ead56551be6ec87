"""Properties of ``bk-bench tune`` (bench/tune.py).

Most tests replace ``Bench.measure`` with a deterministic oracle of the ACT knobs, so the search
logic (grid coverage, constraints, best choice, outputs, shared studies) is checked exactly and
fast; one test runs the real fine-tune-and-measure path on a tiny synthetic setup.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import tune
from bench.cli import build_parser
from bench.pipeline import Bench
from bench.registry import get
from bench.rows import Row
from bk.technique import KnobError
from bk.train import TrainingDiverged

THRESHOLDS = [0.5, 0.8, 0.95]
LAMBDAS = [0.001, 0.05]
GRID = list(product(THRESHOLDS, LAMBDAS))
REFERENCE_LOSS = 1.5


def oracle(threshold: float, lam: float) -> tuple[float, float]:
    """(speedup, quality delta) of the fake measurement: lower threshold and higher lambda are
    faster and worse, so the fastest points are infeasible."""
    return 1 / threshold + 10 * lam, 2 * lam * (1 - threshold)


def fake_measure(self: Bench, technique, knobs) -> Row:
    delay = float(os.environ.get("BK_TUNE_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)
    speed, delta = oracle(knobs["act_threshold"], knobs["act_lambda"])
    layers = 3 * knobs["act_threshold"]
    reference = math.exp(REFERENCE_LOSS)
    return Row(technique.name, "tiny", speed, knobs=dict(knobs), wall_q1=speed,
               wall_q3=speed, rounds=1, t_reference_s=1.0, t_candidate_s=1 / speed,
               flops_speedup=speed, work_ratio=knobs["act_threshold"],
               reference_perplexity=reference, candidate_perplexity=reference * (1 + delta),
               quality_delta=delta, stats={"mean_layers_per_token": layers})


def tune_argv(out: Path, *extra: str) -> list[str]:
    return ["tune", "act", "--method", "grid", "--corpus", "synthetic", "--steps", "1",
            "--no-progress", "--output", str(out),
            "--thresholds", *map(str, THRESHOLDS), "--lambdas", *map(str, LAMBDAS), *extra]


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def fake_worker(argv: list[str], delay: float = 0.0) -> None:
    """A worker process running the tuner against the fake measurement."""
    os.environ["BK_TUNE_TEST_DELAY"] = str(delay)
    Bench.measure = fake_measure
    run_cli(argv)


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


def completed(out: Path) -> list[dict]:
    return [t for t in load(out, "optimization_results.json")["trials"]
            if t["state"] == "COMPLETE"]


def complete_points(trials: list[dict]) -> list[tuple[float, float]]:
    return sorted((t["knobs"]["act_threshold"], t["knobs"]["act_lambda"]) for t in trials)


def best_feasible(budget: float) -> tuple[float, float]:
    feasible = [p for p in GRID if oracle(*p)[1] <= budget]
    return max(feasible, key=lambda p: oracle(*p)[0])


@pytest.fixture
def faked(monkeypatch):
    monkeypatch.setattr(Bench, "measure", fake_measure)


BUDGET = 0.01


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> Path:
    """One grid study over the oracle at a 1% budget, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Bench, "measure", fake_measure)
        run_cli(tune_argv(out, "--max-degradation", str(BUDGET)))
    return out


def test_grid_search_covers_every_grid_point_exactly_once(grid_run):
    trials = load(grid_run, "optimization_results.json")["trials"]
    assert len(trials) == len(GRID)
    assert complete_points(trials) == sorted(GRID)


def test_rerunning_a_finished_grid_study_runs_no_trial_again(faked, grid_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(grid_run, out)
    run_cli(tune_argv(out, "--max-degradation", str(BUDGET)))
    assert complete_points(load(out, "optimization_results.json")["trials"]) == sorted(GRID)
    assert len(load(out, "optimization_results.json")["trials"]) == len(GRID)


def test_best_config_is_the_fastest_feasible_trial(grid_run):
    best = load(grid_run, "best_config.json")
    assert best["feasible"]
    assert (best["knobs"]["act_threshold"], best["knobs"]["act_lambda"]) == best_feasible(BUDGET)
    assert best["figures"]["quality_delta"] <= BUDGET


def test_a_tighter_budget_moves_the_best_config_to_the_fastest_point_within_it(faked, tmp_path):
    budget = 0.0005
    assert best_feasible(budget) != best_feasible(BUDGET)
    run_cli(tune_argv(tmp_path, "--max-degradation", str(budget)))
    best = load(tmp_path, "best_config.json")
    assert (best["knobs"]["act_threshold"], best["knobs"]["act_lambda"]) == best_feasible(budget)


def test_infeasible_trials_are_marked_through_optuna_constraints_and_never_best(grid_run):
    storage = optuna.storages.RDBStorage(f"sqlite:///{grid_run / 'study.db'}")
    study = optuna.load_study(study_name="tune-act", storage=storage)
    infeasible = 0
    for t in study.trials:
        speed, delta = oracle(t.params["act_threshold"], t.params["act_lambda"])
        assert t.user_attrs["constraint"] == pytest.approx(delta - BUDGET)
        assert list(t.constraints.values()) == pytest.approx([delta - BUDGET])  # by the sampler
        infeasible += delta > BUDGET
    assert infeasible > 0, "the oracle grid must contain infeasible points for this test to bite"
    fastest = max(GRID, key=lambda p: oracle(*p)[0])
    assert oracle(*fastest)[1] > BUDGET
    assert study.best_trial.user_attrs["constraint"] <= 0
    records = load(grid_run, "optimization_results.json")["trials"]
    assert all(r["feasible"] == (r["constraint"] <= 0) for r in records)
    assert sum(not r["feasible"] for r in records) == infeasible


def test_no_feasible_trial_writes_an_infeasible_best_config_and_fails(faked, tmp_path):
    argv = tune_argv(tmp_path, "--max-degradation", "0")
    argv[argv.index("--lambdas") + 1:argv.index("--lambdas") + 3] = ["0.05", "0.1"]
    assert run_cli(argv) == 1
    best = load(tmp_path, "best_config.json")
    assert not best["feasible"] and best["knobs"] is None


def test_a_diverged_trial_is_recorded_as_failed_with_its_reason_and_never_rerun(monkeypatch,
                                                                               tmp_path):
    def diverging(self, technique, knobs):
        c = fake_measure(self, technique, knobs)
        if (knobs["act_threshold"], knobs["act_lambda"]) == best_feasible(BUDGET):
            return replace(c, candidate_perplexity=math.nan, quality_delta=math.nan)
        return c

    monkeypatch.setattr(Bench, "measure", diverging)
    run_cli(tune_argv(tmp_path, "--max-degradation", str(BUDGET)))
    run_cli(tune_argv(tmp_path, "--max-degradation", str(BUDGET)))
    trials = load(tmp_path, "optimization_results.json")["trials"]
    [failed] = [t for t in trials if t["state"] == "FAIL"]
    point = (failed["knobs"]["act_threshold"], failed["knobs"]["act_lambda"])
    assert point == best_feasible(BUDGET)
    assert "is nan; expected a finite number" in failed["error"] and not failed["feasible"]
    assert len(trials) == len(GRID)
    best = load(tmp_path, "best_config.json")
    assert (best["knobs"]["act_threshold"], best["knobs"]["act_lambda"]) != best_feasible(BUDGET)


def test_a_grid_point_whose_knobs_contradict_each_other_is_a_failed_trial_saying_why(
        monkeypatch, tmp_path):
    def contradicting(self, technique, knobs):
        if (knobs["act_threshold"], knobs["act_lambda"]) == best_feasible(BUDGET):
            raise KnobError("knob act_lambda: this value does not fit that threshold")
        return fake_measure(self, technique, knobs)

    monkeypatch.setattr(Bench, "measure", contradicting)
    assert run_cli(tune_argv(tmp_path, "--max-degradation", str(BUDGET))) == 0
    trials = load(tmp_path, "optimization_results.json")["trials"]
    [failed] = [t for t in trials if t["state"] == "FAIL"]
    assert "knob act_lambda: this value does not fit" in failed["error"]
    assert len(trials) == len(GRID) and not failed["feasible"]


def test_all_output_files_are_written_and_parseable(grid_run):
    results = load(grid_run, "optimization_results.json")
    meta = load(grid_run, "optimization_metadata.json")
    best = load(grid_run, "best_config.json")
    assert {"number", "state", "knobs", "figures", "feasible"} <= set(results["trials"][0])
    assert meta["settings"]["technique"] == "act" and meta["packages"]["optuna"]
    assert meta["baseline"]["reference_perplexity"] == pytest.approx(math.exp(REFERENCE_LOSS))
    assert meta["baseline"]["quality_split"] == best["quality_split"] == "valid"
    assert best["technique"] == "act"
    summary = (grid_run / "optimization_summary.txt").read_text()
    assert f"#{best['trial']}" in summary
    for png in ("pareto.png", "grid_heatmap.png"):
        assert (grid_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(grid_run.glob(".*tmp*")), "atomic writes leave no temporary files"


def test_pareto_front_holds_exactly_the_non_dominated_trials(grid_run):
    results = load(grid_run, "optimization_results.json")
    front = {(r["knobs"]["act_threshold"], r["knobs"]["act_lambda"]) for r in results["trials"]
             if r["number"] in results["pareto_front"]}

    def dominated(p):
        s, q = oracle(*p)
        return any(oracle(*o)[0] >= s and oracle(*o)[1] <= q and oracle(*o) != (s, q)
                   for o in GRID)

    assert front == {p for p in GRID if not dominated(p)}


@given(st.lists(st.tuples(st.floats(0.5, 5), st.floats(-0.1, 0.5)), min_size=1, max_size=12))
def test_no_pareto_trial_is_dominated_and_every_other_trial_is(points):
    records = [{"number": i, "state": "COMPLETE",
                "figures": {"wall_speedup": s, "quality_delta": q}}
               for i, (s, q) in enumerate(points)]
    front = {r["number"] for r in tune.trial_front(records)}

    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and a != b

    for i, p in enumerate(points):
        assert (i in front) == (not any(dominates(o, p) for o in points))


@pytest.mark.parametrize("metric,expected", [
    ("perplexity", lambda p: -oracle(*p)[1]),
    ("layers", lambda p: -p[0]),
    ("balanced", lambda p: -(1 + oracle(*p)[1]) * p[0]),
])
def test_each_score_metric_picks_its_optimum_within_the_budget(faked, tmp_path, metric,
                                                               expected):
    budget = 0.01
    run_cli(tune_argv(tmp_path, "--score-metric", metric, "--max-degradation", str(budget)))
    best = load(tmp_path, "best_config.json")
    feasible = [p for p in GRID if oracle(*p)[1] <= budget]
    assert (best["knobs"]["act_threshold"], best["knobs"]["act_lambda"]) == max(feasible,
                                                                                key=expected)


def test_bayesian_search_runs_the_requested_number_of_trials_within_the_knob_ranges(faked,
                                                                                     tmp_path):
    argv = ["tune", "act", "--method", "bayesian", "--n-calls", "6", "--corpus", "synthetic",
            "--no-progress", "--output", str(tmp_path)]
    run_cli(argv)
    trials = load(tmp_path, "optimization_results.json")["trials"]
    assert len(trials) == 6 and all(t["state"] == "COMPLETE" for t in trials)
    knobs = {k.name: k for k in get("act").knobs}
    for t in trials:
        for name, value in t["knobs"].items():
            low, high = knobs[name].search_range
            assert low <= value <= high


def test_grid_points_for_a_range_knob_span_its_bounds_log_spaced():
    knob = next(k for k in get("act").knobs if k.name == "act_lambda")
    points = tune._range_points(knob, 5)
    low, high = knob.search_range
    assert points[0] == pytest.approx(low) and points[-1] == pytest.approx(high)
    ratios = [b / a for a, b in zip(points, points[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * 4, rel=1e-4)


def test_an_unknown_knob_in_explicit_values_is_a_clear_error(faked, tmp_path):
    with pytest.raises(ValueError, match="has no knob 'act_depth'"):
        run_cli(["tune", "act", "--method", "grid", "--values", "act_depth=1,2",
                 "--corpus", "synthetic", "--output", str(tmp_path)])


def test_resuming_a_study_with_other_settings_is_a_clear_error(faked, grid_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(grid_run, out)
    with pytest.raises(ValueError, match="was created with other settings"):
        run_cli(tune_argv(out, "--max-degradation", "0.02"))


def stored_settings(out: Path, study: str = "tune-act") -> dict:
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name=study, storage=storage).user_attrs["settings"]


@pytest.mark.parametrize("change,named", [
    (["--steps", "2"], "setup.steps: study 1, this worker 2"),
    (["--seed", "1"], "setup.seed: study 0, this worker 1"),
    (["--seq-len", "64"], "setup.seq_len: study 128, this worker 64"),
    (["--score-metric", "layers"], "score_metric: study 'speedup', this worker 'layers'"),
])
def test_a_worker_with_other_settings_is_refused_naming_them_and_changes_nothing(
        faked, grid_run, tmp_path, change, named):
    # A worker with other --steps once joined silently and rewrote the study's metadata.
    out = tmp_path / "again"
    shutil.copytree(grid_run, out)
    before = stored_settings(out)
    metadata = (out / "optimization_metadata.json").read_text()
    with pytest.raises(ValueError, match="was created with other settings") as caught:
        run_cli(tune_argv(out, "--max-degradation", str(BUDGET), *change))
    assert named in str(caught.value)
    assert stored_settings(out) == before
    assert (out / "optimization_metadata.json").read_text() == metadata


def test_a_study_from_before_a_setting_existed_compares_as_taken_at_its_value_then():
    ours = {"technique": "act", "setup": {"steps": 1, "start": "dense"}}
    old = {"technique": "act", "setup": {"steps": 1}}
    assert tune.settings_differences(old, ours) == []
    assert tune.settings_differences(old, {**ours, "setup": {"steps": 1, "start": "scratch"}}) == [
        "setup.start: study 'dense', this worker 'scratch'"]


def test_a_worker_with_another_corpus_content_is_refused(faked, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("abcab cabba " * 300)
    argv = tune_argv(tmp_path / "out", "--max-degradation", str(BUDGET))
    argv[argv.index("synthetic")] = f"text:{text}"
    run_cli(argv)
    text.write_text("bacca abcab " * 300)
    with pytest.raises(ValueError, match="corpus_fingerprint: study"):
        run_cli(argv)


def test_two_bayesian_workers_on_one_study_try_different_points(tmp_path, start_workers):
    # Seeded alike, two workers once ran the same trials (6 trials, 3 distinct settings).
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.storages.RDBStorage(storage)  # tables first: no creation race
    argv = ["tune", "act", "--method", "bayesian", "--n-calls", "6", "--corpus", "synthetic",
            "--no-progress", "--storage", storage]
    join_all(start_workers([[*argv, "--output", str(tmp_path / o)] for o in "ab"], delay=0.3))
    trials = completed(tmp_path / "a")
    assert len(trials) == 6
    assert len({tuple(sorted(t["knobs"].items())) for t in trials}) == 6


def test_a_bayesian_study_repeats_with_its_seed(faked, tmp_path):
    argv = ["tune", "act", "--method", "bayesian", "--n-calls", "4", "--corpus", "synthetic",
            "--no-progress"]
    points = []
    for folder in ("a", "b"):
        run_cli([*argv, "--output", str(tmp_path / folder)])
        points.append([t["knobs"] for t in load(tmp_path / folder,
                                                "optimization_results.json")["trials"]])
    assert points[0] == points[1]


def test_a_trial_exactly_at_the_quality_budget_is_feasible(monkeypatch, tmp_path):
    # A mutant taking `<` for `<=` survived: nothing measured a delta equal to the budget.
    delta = oracle(0.5, 0.001)[1]  # exactly the fake measurement's delta at this point
    seen = []

    def exact(self, technique, knobs):
        c = fake_measure(self, technique, knobs)
        seen.append(c.quality_delta)
        return c

    monkeypatch.setattr(Bench, "measure", exact)
    budget = repr(exact(None, get("act"), {"act_threshold": 0.5, "act_lambda": 0.001})
                  .quality_delta)
    argv = ["tune", "act", "--method", "grid", "--values", "act_threshold=0.5",
            "--values", "act_lambda=0.001", "--corpus", "synthetic", "--no-progress",
            "--max-degradation", budget, "--output", str(tmp_path)]
    assert run_cli(argv) == 0
    [trial] = load(tmp_path, "optimization_results.json")["trials"]
    assert seen[-1] == float(budget) and trial["constraint"] == 0.0
    assert trial["feasible"] and load(tmp_path, "best_config.json")["feasible"]
    assert delta == pytest.approx(float(budget))
    out = tmp_path / "validation"
    assert run_cli(["tune", "act", "--validate", str(tmp_path / "best_config.json"),
                    "--corpus", "synthetic", "--no-progress", "--output", str(out)]) == 0
    assert load(out, "validation_results.json")["feasible"]


def test_a_diverged_fine_tuning_is_a_failed_trial_with_its_reason(monkeypatch, tmp_path):
    def diverging(self, technique, knobs):
        if knobs["act_threshold"] == THRESHOLDS[0]:
            raise TrainingDiverged("fine-tune act diverged: NaN or infinite weights")
        return fake_measure(self, technique, knobs)

    monkeypatch.setattr(Bench, "measure", diverging)
    run_cli(tune_argv(tmp_path, "--max-degradation", str(BUDGET)))
    trials = load(tmp_path, "optimization_results.json")["trials"]
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert len(failed) == len(LAMBDAS) and all("diverged" in t["error"] for t in failed)
    assert len(completed(tmp_path)) == len(GRID) - len(LAMBDAS)


def test_validate_writes_validation_results_for_the_best_config(faked, grid_run, tmp_path):
    best = load(grid_run, "best_config.json")
    out = tmp_path / "validation"
    assert run_cli(["tune", "act", "--validate", str(grid_run / "best_config.json"),
                    "--corpus", "synthetic", "--no-progress", "--output", str(out)]) == 0
    validation = load(out, "validation_results.json")
    assert validation["knobs"] == best["knobs"] and validation["feasible"]
    assert validation["figures"]["wall_speedup"] == pytest.approx(
        oracle(best["knobs"]["act_threshold"], best["knobs"]["act_lambda"])[0])


TEST_OFFSET = 0.02  # the fake test split's delta above the validation split's: past BUDGET


def test_trials_choose_on_the_validation_split_and_validation_reports_the_test_split(
        monkeypatch, tmp_path):
    seen = []

    def measure(self: Bench, technique, knobs) -> Row:
        seen.append(self.setup.quality_split)
        row = fake_measure(self, technique, knobs)
        if self.setup.quality_split == "valid":
            return row
        delta = row.quality_delta + TEST_OFFSET
        return replace(row, candidate_perplexity=row.reference_perplexity * (1 + delta),
                       quality_delta=delta)

    monkeypatch.setattr(Bench, "measure", measure)
    tuned, out = tmp_path / "tuned", tmp_path / "validation"
    assert run_cli(tune_argv(tuned, "--max-degradation", str(BUDGET))) == 0
    assert seen == ["valid"] * len(GRID)
    best = load(tuned, "best_config.json")
    assert best["quality_split"] == "valid" and best["figures"]["quality_delta"] <= BUDGET
    seen.clear()
    # Measured on the test split, the configuration chosen on the validation split is out of
    # its budget: the command says so (exit 1) and the file holds both figures.
    assert run_cli(["tune", "act", "--validate", str(tuned / "best_config.json"), "--corpus",
                    "synthetic", "--quality-split", "valid", "--no-progress", "--output",
                    str(out)]) == 1
    assert seen == ["test"]
    validation = load(out, "validation_results.json")
    assert validation["tuned_quality_split"] == "valid" and not validation["feasible"]
    assert validation["figures"]["quality_delta"] == pytest.approx(
        best["figures"]["quality_delta"] + TEST_OFFSET)
    assert validation["tuned_figures"] == best["figures"]
    seen.clear()
    assert run_cli(tune_argv(tmp_path / "on-test", "--quality-split", "test",
                             "--max-degradation", "1")) == 0
    assert seen == ["test"] * len(GRID)


def test_a_validation_fine_tunes_as_long_as_the_tuning_did(faked, tmp_path):
    tuned, out = tmp_path / "tuned", tmp_path / "validation"
    assert run_cli(tune_argv(tuned, "--steps", "100", "--finetune", "3",
                             "--max-degradation", "1")) == 0
    steps = load(tuned, "optimization_metadata.json")["finetune_steps"]
    assert steps == round(100 * get("act").finetune_fraction * 3)
    assert run_cli(["tune", "act", "--validate", str(tuned / "best_config.json"), "--corpus",
                    "synthetic", "--steps", "100", "--no-progress", "--output", str(out)]) == 0
    assert load(out, "validation_results.json")["finetune_steps"] == steps


@pytest.mark.parametrize("url", ["nonsense://x", "sqlite:////nonexistent/folder/study.db"])
def test_a_storage_that_cannot_be_opened_is_a_clear_error(faked, tmp_path, monkeypatch, url):
    monkeypatch.setattr(tune.time, "sleep", lambda seconds: None)  # no waits between retries
    with pytest.raises(ValueError, match=f"cannot open the study storage {url}: "):
        run_cli(tune_argv(tmp_path, "--storage", url))


def test_validate_rejects_a_config_for_another_technique(faked, tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"technique": "early_exit", "knobs": {}}))
    with pytest.raises(ValueError, match="is for technique 'early_exit'"):
        run_cli(["tune", "act", "--validate", str(path), "--corpus", "synthetic",
                 "--output", str(tmp_path)])


# ----------------------------------------------------------------------------- shared studies

@pytest.fixture
def start_workers():
    """Start worker processes on argv lists; any still alive at teardown are killed."""
    ctx = multiprocessing.get_context("fork")  # no re-import: fast, and nothing runs threads here
    started: list[multiprocessing.Process] = []

    def start(argvs: list[list[str]], delay: float) -> list[multiprocessing.Process]:
        workers = [ctx.Process(target=fake_worker, args=(argv, delay)) for argv in argvs]
        for w in workers:
            w.start()
        started.extend(workers)
        return workers

    yield start
    for w in started:
        if w.is_alive():
            w.kill()
            w.join()


def join_all(workers: list[multiprocessing.Process], timeout: float = 300) -> None:
    for w in workers:
        w.join(timeout)
        assert w.exitcode == 0, f"worker exited with {w.exitcode}"


def check_shared_grid(out: Path) -> None:
    """Every grid point completed exactly once; any other trial is one the race guard pruned
    before measuring (two workers seeing the last free slot at once)."""
    trials = load(out, "optimization_results.json")["trials"]
    assert complete_points([t for t in trials if t["state"] == "COMPLETE"]) == sorted(GRID)
    others = [(t["number"], t["state"]) for t in trials if t["state"] != "COMPLETE"]
    assert all(state == "PRUNED" for _, state in others), others


def test_two_worker_processes_on_one_sqlite_study_lose_no_trials(tmp_path, start_workers):
    outs = [tmp_path / "a", tmp_path / "b"]
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    join_all(start_workers([tune_argv(o, "--storage", storage) for o in outs], delay=0.3))
    for out in outs:
        check_shared_grid(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster on a free localhost port, run by an unprivileged user."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql); "
                    "shared-study test not run")
    pytest.importorskip("psycopg2", reason="psycopg2 not installed (pip install "
                                           "'bk-bench[postgres]'); shared-study test not run")
    # Not under tmp_path: pytest's base folder is private to this user, and initdb refuses to
    # run as root, so as root the cluster lives in its own folder owned by the postgres user.
    root = Path(tempfile.mkdtemp(prefix="bk-bench-pg-"))
    data, port = root / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser; cannot start PostgreSQL as postgres")
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "bk", "--auth=trust")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "bk",
                "optuna")
            yield f"postgresql://bk@127.0.0.1:{port}/optuna"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_two_worker_processes_on_one_postgresql_study_lose_no_trials(tmp_path, postgres_url,
                                                                      start_workers):
    outs = [tmp_path / "a", tmp_path / "b"]
    join_all(start_workers([tune_argv(o, "--storage", postgres_url) for o in outs], delay=0.3))
    for out in outs:
        check_shared_grid(out)


def test_a_killed_worker_trial_is_failed_by_heartbeat_and_the_study_completes(tmp_path,
                                                                            start_workers):
    storage_url = f"sqlite:///{tmp_path / 'shared.db'}"
    beats = ["--storage", storage_url, "--heartbeat-interval", "1", "--grace-period", "2"]
    storage = optuna.storages.RDBStorage(storage_url)  # tables first: no creation race
    [victim] = start_workers([tune_argv(tmp_path / "victim", *beats)], delay=60)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the victim never started a trial"
        try:
            study = optuna.load_study(study_name="tune-act", storage=storage)
            if any(t.state == optuna.trial.TrialState.RUNNING and len(t.params) == 2
                   for t in study.trials):
                break  # the victim is measuring
        except KeyError:  # study not created yet
            pass
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    [survivor] = start_workers([tune_argv(tmp_path / "survivor", *beats)], delay=0)
    join_all([survivor])
    trials = load(tmp_path / "survivor", "optimization_results.json")["trials"]
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert len(failed) == 1
    retry = [t for t in trials if t["retry_of"] == failed[0]["number"]]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE"
    assert complete_points([t for t in trials if t["state"] == "COMPLETE"]) == sorted(GRID)


# ----------------------------------------------------------------------------- the real path

def test_the_real_fine_tune_and_measure_path_writes_a_feasible_or_explained_best(tmp_path):
    argv = ["tune", "act", "--method", "grid", "--values", "act_threshold=0.9",
            "--values", "act_lambda=0.01", "--corpus", "synthetic", "--steps", "4",
            "--seq-len", "16", "--batch-size", "4", "--rounds", "1", "--quick",
            "--max-degradation", "1.0", "--no-progress", "--output", str(tmp_path)]
    run_cli(argv)
    [trial] = load(tmp_path, "optimization_results.json")["trials"]
    assert trial["state"] == "COMPLETE"
    figures = trial["figures"]
    assert figures["wall_speedup"] > 0 and 0 < figures["work_ratio"] <= 1
    assert math.isfinite(figures["quality_delta"])
    assert trial["feasible"] == (figures["quality_delta"] <= 1.0)
