"""The gate and its calibration: an exactly known injected slowdown, the gate's decision rule
(asv's) at its boundary, false alarms and detections counted over pairs of runs, the settings
chosen from them, and a cheap calibration in fresh processes end to end."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from asv.commands.compare import _is_result_better
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from bench import calibrate as calibration
from bench import gate
from bench.baselines import Target
from bench.calibrate import Measurement, choose, gate_false_alarms, score
from bench.cli import main
from bench.measure import Speedup, Workload
from tests.strategies import FakeClock, Timed


def fake_bench(clock: FakeClock, dense_cost: float, candidate_cost: float):
    """A gate's models whose forward passes cost exactly what is given, on three batches."""
    workload = Workload("fake", [torch.zeros(1, 2, dtype=torch.int64)] * 3)
    dense = Timed(nn.Identity(), clock, dense_cost)
    candidate = Timed(nn.Identity(), clock, candidate_cost)
    return SimpleNamespace(workload=workload, dense=lambda: dense,
                           candidate=lambda name: candidate if name == "x" else dense)


def test_a_10_percent_slowdown_injected_into_the_candidate_costs_it_exactly_10_percent_more():
    clock = FakeClock()
    b = fake_bench(clock, dense_cost=30.0, candidate_cost=10.0)
    plain = gate.measure_technique(b, "x", passes=2, clock=clock, wait=clock.advance)
    assert plain.ratios == (3.0,) * 6 and gate.time_ratio(plain) == 1 / 3
    slow = gate.measure_technique(b, "x", passes=2, slowdown=0.1, clock=clock,
                                  wait=clock.advance)
    assert slow.t_reference == 30.0 and slow.t_candidate == 11.0  # the dense model untouched
    assert slow.ratios == (30.0 / 11.0,) * 6
    assert gate.time_ratio(slow) / gate.time_ratio(plain) == pytest.approx(1.1, rel=1e-12)


def test_the_gate_flags_a_ratio_grown_by_more_than_the_factor_and_nothing_else():
    assert not gate.regressed(1.0, 1.25, 1.25)  # grown by exactly the factor: not more
    assert gate.regressed(1.0, math.nextafter(1.25, 2), 1.25)
    assert gate.regressed(0.5, 0.55, 1.05)  # 10% worse
    assert not gate.regressed(0.5, 0.52, 1.05)  # 4% worse
    assert not gate.regressed(0.55, 0.5, 1.05)  # 10% better is no regression
    assert not gate.regressed(0.5, 0.5, 1.05)


ratios = st.floats(1e-3, 1e3)


@given(ratios, ratios, st.floats(1.0, 2.0, exclude_min=True))
@example(1.0, 1.25, 1.25)
@example(1.0, math.nextafter(1.25, 2), 1.25)
@example(2.596578335426704, 2.7523730355523064, 1.06)  # parent * factor < head differs here
@example(7.981370843016821, 8.300625676737495, 1.04)  # and here, the other way
def test_the_gate_rule_is_asv_continuous_rule_for_a_single_valued_benchmark(parent, head, factor):
    # asv reports a regression when `_is_result_better(parent, head, ...)`: the parent's value
    # is better (lower) than HEAD's by the factor; one value per commit gives no statistics.
    assert gate.regressed(parent, head, factor) == _is_result_better(parent, head, None, None,
                                                                     factor)


@pytest.mark.parametrize(("deltas", "speeds", "source"), [
    ({"combined": 0.04, "a": 0.0}, {"combined": 1.5, "a": 3.0}, "combined"),
    ({"combined": 0.06, "a": 0.01, "b": 0.0}, {"combined": 4.0, "a": 2.0, "b": 1.5}, "a"),
    ({"combined": 0.5, "a": 0.01}, {"combined": 4.0, "a": 0.9}, "dense"),
])
def test_the_gated_cumulative_times_the_records_source_and_each_technique_once(
        monkeypatch, deltas, speeds, source):
    """The combined model within budget, else the fastest technique within budget if faster
    than dense, else dense against itself: the benchmark's figure is that source's speed."""
    monkeypatch.setattr(gate, "techniques", lambda: ["dense", *deltas])
    monkeypatch.setattr(gate, "evaluate", lambda model, corpus, max_batches: SimpleNamespace(
        perplexity=1.0 + deltas.get(model, 0.0)))
    b = SimpleNamespace(setup=SimpleNamespace(quality_batches=2), corpus=None,
                        target=Target(10.0, 0.05, 0.1, 0.1), candidate=lambda name: name,
                        reference=lambda name: "dense")
    timed = []

    def measure(name: str) -> Speedup:
        timed.append(name)
        return Speedup((speeds.get(name, 1.0),), 1.0, 1.0)

    speed = gate.measure_cumulative(b, passes=1, measure=measure)
    assert speed.speedup == speeds.get(source, 1.0) and source in timed
    assert len(timed) == len(set(timed))


def test_a_measurements_ratio_after_fewer_passes_is_that_of_its_first_passes():
    m = Measurement((1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 2.0, 2.0, 2.0), batches=3)
    assert m.passes == 3
    assert m.time_ratio(1) == 1 / 2.0
    assert m.time_ratio(2) == 1 / 6.0  # median of 1, 2, 4, 8, 8, 8
    assert m.time_ratio(3) == gate.time_ratio(Speedup(m.ratios, 1.0, 1.0)) == 1 / 2.0
    for bad in (0, 4):
        with pytest.raises(ValueError, match="1 to 3 passes"):
            m.time_ratio(bad)


def run_of(**time_ratios: tuple[float, float]) -> dict[str, tuple[Measurement, Measurement]]:
    """A run whose benchmarks measured these (plain, slowed) time ratios in every round."""
    return {b: (Measurement((1 / plain,) * 2, 1), Measurement((1 / slow,) * 2, 1))
            for b, (plain, slow) in time_ratios.items()}


def test_identical_runs_raise_no_false_alarm_and_an_exact_10_percent_slowdown_is_detected():
    runs = [run_of(b=(0.5, 0.55)) for _ in range(4)]
    s = score(runs, "b", passes=2, factor=1.05)
    assert (s.comparisons, s.false_alarms, s.detections) == (12, 0, 12)
    assert s.largest_aa_change == 1.0 and s.smallest_injected_change == pytest.approx(1.1)
    assert score(runs, "b", passes=2, factor=1.15).detections == 0
    assert gate_false_alarms(runs, 2, 1.01) == 0


def test_false_alarms_and_detections_are_counted_over_ordered_pairs_of_runs():
    runs = [run_of(b=(0.5, 0.55)), run_of(b=(0.52, 0.56)), run_of(b=(0.5, 0.5))]
    s = score(runs, "b", passes=1, factor=1.03)
    # A/A: 0.52 / 0.5 = 1.04 is flagged as HEAD over either other run, never the reverse
    assert (s.comparisons, s.false_alarms) == (6, 2)
    assert s.largest_aa_change == pytest.approx(1.04)
    # slowed HEAD over parent: 0.56/0.5 (twice), 0.55/0.5 and 0.55/0.52 = 1.058 are flagged,
    # 0.5/0.5 and 0.5/0.52 are not
    assert s.detections == 4
    assert s.smallest_injected_change == pytest.approx(0.5 / 0.52)
    assert score(runs, "b", passes=1, factor=1.05).false_alarms == 0


def test_the_gate_fails_on_a_pair_when_any_benchmark_is_flagged():
    runs = [run_of(a=(0.5, 0.6), b=(0.5, 0.6)), run_of(a=(0.6, 0.6), b=(0.5, 0.6)),
            run_of(a=(0.5, 0.6), b=(0.6, 0.6))]
    # a flags (0, 1) and (2, 1); b flags (0, 2) and (1, 2)
    assert gate_false_alarms(runs, 1, 1.05) == 4
    assert [score(runs, b, 1, 1.05).false_alarms for b in "ab"] == [2, 2]


def test_the_chosen_settings_avoid_false_alarms_then_save_passes_then_keep_a_margin():
    # One batch per pass. The first pass of run 1 is slow, so one or two passes raise false
    # alarms; with three passes the medians agree. The slowed candidate is 10% slower.
    runs = [{"b": (Measurement((2.0, 2.0, 2.0), 1), Measurement((2 / 1.1,) * 3, 1))},
            {"b": (Measurement((1.0, 2.0, 2.0), 1), Measurement((2 / 1.1,) * 3, 1))}]
    assert score(runs, "b", 1, 1.05).false_alarms == 1
    assert score(runs, "b", 3, 1.05).false_alarms == 0
    # at 3 passes every factor below 1.1 detects everything; 1.05 sits nearest sqrt(1.1)
    assert choose(runs, passes=[1, 2, 3], factors=[1.02, 1.05, 1.08, 1.2]) == (3, 1.05)
    clean = [runs[0], runs[0]]
    assert choose(clean, passes=[1, 3], factors=[1.02, 1.05]) == (1, 1.05)
    # One pass detects everything at 1.05 but also flags identical code (a 6% slow first pass):
    # the false alarms cost more than the extra passes.
    alarming = [{"b": (Measurement((2.0, 2.0, 2.0), 1), Measurement((2 / 1.2,) * 3, 1))},
                {"b": (Measurement((2 / 1.06, 2.0, 2.0), 1), Measurement((2 / 1.2,) * 3, 1))}]
    assert score(alarming, "b", 1, 1.05).detections == 2
    assert choose(alarming, passes=[1, 3], factors=[1.05]) == (3, 1.05)


def test_a_factor_just_above_the_noise_seen_is_not_chosen_even_if_it_detects_more():
    # A/A change 0.5225 / 0.5 = 1.045: 1.05 raises no alarm here and detects both slowdowns
    # (1.12 and 0.55 / 0.5225 = 1.053), but sits 0.5% above the noise; 1.08 misses one.
    runs = [run_of(b=(0.5, 0.55)), run_of(b=(0.5225, 0.56))]
    assert score(runs, "b", 1, 1.05).false_alarms == 0
    assert [score(runs, "b", 1, f).detections for f in (1.05, 1.08)] == [2, 1]
    assert choose(runs, passes=[1], factors=[1.05, 1.08]) == (1, 1.08)


def option(args: tuple[str, ...], flag: str) -> str:
    return args[args.index(flag) + 1]


def fake_process(calls: list[tuple[str, ...]]):
    """``python -m bench.gate`` in this process: training marks the folder; a measurement
    writes a time ratio of 0.5, or 0.55 when slowed by 10%."""

    def process(*args: str, cwd: str) -> None:
        calls.append((*args, cwd))
        if args[0] == "train":
            assert list(Path(args[1]).iterdir()) == [], "a run trains into a fresh folder"
            (Path(args[1]) / "trained").write_text("")
            return
        assert (Path(args[1]) / "trained").exists(), "measured before training"
        ratio = 2.0 if float(option(args, "--slowdown")) == 0 else 2 / 1.1
        rounds = 3 * int(option(args, "--passes"))
        Path(option(args, "--result")).write_text(json.dumps({"ratios": [ratio] * rounds,
                                                              "batches": 3}))

    return process


def test_a_calibration_trains_each_run_afresh_measures_each_benchmark_and_writes_the_gate(
        tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(calibration, "_process", fake_process(calls))
    chosen = ["track_time_ratio(sparsity)", gate.CUMULATIVE]
    assert main(["calibrate", "--runs", "3", "--benchmarks", *chosen, "--passes", "1", "2",
                 "--factors", "1.05", "1.2", "--corpus", "synthetic", "--steps", "1",
                 "--output", str(tmp_path), "--gate-file", str(tmp_path / "gate.json"),
                 "--no-progress"]) == 0
    assert "gate: factor 1.05, 1 passes per ratio" in capsys.readouterr().out
    trains = [c for c in calls if c[0] == "train"]
    assert len(trains) == 3 and len({c[1] for c in trains}) == 3
    cumulative = gate.measured_techniques(gate.CUMULATIVE)  # any technique may be its source
    assert trains[0][1:] == (trains[0][1], "--corpus", "synthetic", "--steps", "1",
                             "--techniques", *dict.fromkeys(["sparsity", *cumulative]),
                             trains[0][1])
    measures = [c for c in calls if c[0] == "measure"]
    assert [(c[2], option(c, "--slowdown")) for c in measures[:4]] == [
        (chosen[0], "0.0"), (chosen[0], "0.1"), (chosen[1], "0.0"), (chosen[1], "0.1")]
    assert len(measures) == 12 and all(option(c, "--passes") == "2" for c in measures)
    assert gate.GateSettings.load(tmp_path / "gate.json") == gate.GateSettings(1.05, 1)
    written = json.loads((tmp_path / "calibration.json").read_text())
    assert (written["passes"], written["factor"]) == (1, 1.05)
    assert [(s["false_alarms"], s["detections"]) for s in written["scores"]
            if (s["passes"], s["factor"]) == (1, 1.05)] == [(0, 6), (0, 6)]
    assert len(written["scores"]) == 2 * 2 * 2 and len(written["measurements"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json", "gate.json"]


def test_a_run_trains_and_measures_in_fresh_processes_of_its_own(tmp_path):
    # The cheap mode: the synthetic corpus, one training step, one pass; the slowed measurement
    # alone (the plain one differs only in --slowdown, checked above).
    options = ["--corpus", "synthetic", "--steps", "1"]
    calibration._process("train", str(tmp_path), *options, "--techniques", "sparsity",
                         cwd=str(tmp_path))
    m = calibration._measure(str(tmp_path), "track_time_ratio(sparsity)", options, passes=2,
                             slowdown=0.1)
    assert m.batches == gate.WORKLOAD_BATCHES and m.passes == 2
    assert all(math.isfinite(r) and r > 0 for r in m.ratios)


def test_bad_calibration_settings_and_unknown_benchmarks_give_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="runs >= 2"):
        calibration.calibrate(runs=1, output=tmp_path)
    with pytest.raises(ValueError, match="0 < slowdown < 1"):
        calibration.calibrate(slowdown=1.5, output=tmp_path)
    with pytest.raises(ValueError, match="factors > 1"):
        calibration.calibrate(factors=(1.0,), output=tmp_path)
    assert main(["calibrate", "--benchmarks", "nope", "--output", str(tmp_path)]) == 2
    assert "not gated benchmarks: ['nope']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown gated benchmark 'nope'"):
        gate.measured_techniques("nope")


@pytest.mark.parametrize(("text", "message"), [
    ('{"factor": 1.0, "passes": 25}', "factor must be a number > 1"),
    ('{"factor": "1.05", "passes": 25}', "factor must be a number > 1"),
    ('{"factor": 1.05, "passes": 0}', "passes must be an integer >= 1"),
    ('{"factor": 1.05, "passes": true}', "passes must be an integer >= 1"),
    ('{"passes": 25}', "factor"),
    ("{", "not valid JSON"),
    ("[1.05, 25]", "expected an object"),
])
def test_bad_gate_settings_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "gate.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        gate.GateSettings.load(path)


def test_the_committed_gate_settings_load():
    settings = gate.GateSettings.load(Path(__file__).resolve().parent.parent / gate.GATE_FILE)
    assert settings.factor > 1 and settings.passes >= 1


def test_the_asv_suite_reports_what_the_gate_measures(monkeypatch):
    from suites import bench_techniques as suite

    asked = []

    def measured(b, name, passes, **kwargs):
        asked.append((b, name, passes, kwargs))
        return Speedup((4.0,), 4.0, 1.0)

    monkeypatch.setattr(gate, "bench", lambda folder, target: f"bench of {folder}"
                        if target == suite.TARGET else None)
    monkeypatch.setattr(gate, "measure_technique", measured)
    assert suite.Technique().track_time_ratio("cache", "act") == 0.25
    assert suite.Technique().track_speedup("cache", "act") == 4.0
    assert asked == [("bench of cache", "act", suite.SETTINGS.passes, {})] * 2
    assert suite.NAMES == [gate.measured_techniques(b)[0] for b in gate.benchmarks()[:-1]]


def test_the_asv_suite_still_measures_commits_whose_gate_takes_no_target(monkeypatch):
    # asv runs this suite against older commits' packages too (a history), whose gate.bench
    # had no target parameter.
    from suites import bench_techniques as suite

    monkeypatch.setattr(gate, "bench", lambda folder: f"old bench of {folder}")
    monkeypatch.setattr(gate, "measure_technique",
                        lambda b, name, passes: Speedup((2.0,), 2.0, 1.0)
                        if b == "old bench of cache" else None)
    assert suite.Technique().track_time_ratio("cache", "act") == 0.5
