"""One result row type (bench/rows.py): its JSON round trip, its checks, the one Pareto front
and the one cumulative figure the records and the asv suite share."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import baselines, gate, report, tune
from bench.files import dump_json
from bench.measure import Speedup
from bench.registry import REFERENCE, techniques
from bench.rows import DERIVED, PATTERNS, Row, RowError, pareto_front
from bk.train import Evaluation

TARGET = baselines.Target(10.0, 0.05, 0.01, 0.1)
positive = st.floats(1e-3, 1e3)
knob_values = st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.booleans(), st.none(),
                        st.sampled_from(["fast", "balanced"]))


@st.composite
def rows(draw, technique=None, scale=None) -> Row:
    """A row with every field drawn, consistent as a measurement makes it."""
    wall = draw(positive)
    q1, q3 = wall / draw(st.floats(1, 2)), wall * draw(st.floats(1, 2))
    quality = {}
    if draw(st.booleans()):
        ref, cand = draw(positive), draw(positive)
        quality = {"reference_perplexity": ref, "candidate_perplexity": cand,
                   "quality_delta": cand / ref - 1}
    ceilings = {}
    decisions = draw(st.sampled_from([None, "none", "learned"]))
    if decisions is not None:
        ceilings = {f"ceiling_{p}": draw(positive) for p in PATTERNS}
    if decisions == "learned":
        ceilings.update({f"keep_{p}": draw(st.floats(1e-3, 1)) for p in PATTERNS})
    return Row(
        technique=technique or draw(st.sampled_from(["act", "mod", "<b>&x"])),
        scale=scale or draw(st.sampled_from(["tiny", "small", "base"])), wall_speedup=wall,
        knobs=draw(st.dictionaries(st.sampled_from(["a", "b_c", "target"]), knob_values)),
        wall_q1=q1, wall_q3=q3, rounds=draw(st.integers(1, 500)),
        noise_warning=draw(st.none() | st.just("noisy: spread 30%")),
        t_reference_s=draw(positive), t_candidate_s=draw(positive),
        flops_speedup=draw(positive), work_ratio=draw(st.floats(0.01, 2)),
        token_layers=draw(st.integers(0, 10**9)), expert_calls=draw(st.integers(0, 10**9)),
        positions=draw(st.integers(0, 10**9)), counts=draw(st.none() | st.booleans()),
        decisions=decisions,
        stats=draw(st.dictionaries(st.sampled_from(["mean_layers_per_token", "mean_exit"]),
                                   st.floats(0, 8))),
        **quality, **ceilings)


@given(rows())
def test_a_row_reads_back_from_its_json_exactly(row):
    text = dump_json(row.to_dict())
    assert Row.from_dict(json.loads(text), "results.json") == row


@given(rows())
def test_the_derived_figures_are_written_for_readers_and_recomputed_on_reading(row):
    data = row.to_dict()
    assert set(DERIVED) <= set(data)
    tampered = {**data, **{name: 123.0 for name in DERIVED}}
    back = Row.from_dict(tampered, "x")
    assert back == row and back.derived() == row.derived()


@given(rows())
def test_ceilings_split_the_ideal_into_implementation_overhead_and_decision_cost(row):
    for pattern in PATTERNS:
        ceiling = row.ceiling(pattern)
        if ceiling is None:
            assert row.overhead(pattern) is None and row.decision_cost(pattern) is None
            continue
        # realised = ideal x (1 - overhead) x (1 - decision cost)
        assert row.ideal * (1 - row.overhead(pattern)) * (1 - row.decision_cost(pattern)) == (
            pytest.approx(row.wall_speedup, rel=1e-9))
        assert row.overhead(pattern) == pytest.approx(1 - ceiling * row.work_ratio, rel=1e-9)


def test_a_csv_line_holds_the_knobs_as_text():
    row = Row("act", "tiny", 1.2, knobs={"act_threshold": 0.9, "act_lambda": None, "k": 2})
    assert row.flat()["knobs"] == "act_threshold=0.9, k=2"
    assert Row.from_dict(row.flat(), "results.csv").knobs == {"act_threshold": 0.9, "k": 2}


def test_rows_of_results_written_before_rows_carried_a_scale_take_the_given_one():
    old = {"technique": "act", "knobs": "act_threshold=0.9", "wall_speedup": 1.1,
           "flops_reference": 10, "reference_loss": 1.0}  # columns of older versions: unread
    row = Row.from_dict(old, "old.json", scale="tiny")
    assert (row.scale, row.knobs, row.wall_speedup) == ("tiny", {"act_threshold": 0.9}, 1.1)
    with pytest.raises(RowError, match="old.json: technique 'act' scale is None"):
        Row.from_dict(old, "old.json")


GOOD = Row("act", "small", 2.0, wall_q1=1.9, wall_q3=2.1, reference_perplexity=10.0,
           candidate_perplexity=10.5, quality_delta=0.05, keep_uniform=0.5,
           ceiling_uniform=2.5).to_dict()
MALFORMED = {
    "a NaN speedup": ({"wall_speedup": math.nan}, "wall_speedup is nan"),
    "an infinite quartile": ({"wall_q3": math.inf}, "wall_q3 is inf"),
    "a zero speedup": ({"wall_speedup": 0.0}, "wall_speedup is 0.0; expected a positive"),
    "a speedup as text": ({"wall_speedup": "2x"}, "wall_speedup is '2x'"),
    "an IQR without the median": ({"wall_q1": 2.05}, "does not contain the median"),
    "a delta its perplexities do not give": ({"quality_delta": 0.04}, "perplexities"),
    "a keep rate above one": ({"keep_uniform": 1.5}, "keep_uniform is 1.5"),
    "a negative work ratio": ({"work_ratio": -0.5}, "work_ratio is -0.5"),
    "a fractional count": ({"token_layers": 2.5}, "token_layers is 2.5"),
    "counts as text": ({"counts": "yes"}, "counts is 'yes'"),
    "unknown decisions": ({"decisions": "some"}, "decisions is 'some'"),
    "a statistic as text": ({"mean_exit": "3"}, "mean_exit is '3'"),
    "knobs as a list": ({"knobs": [1]}, "knobs is [1]"),
    "no technique": ({"technique": None}, "lacks its 'technique'"),
}


@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_a_malformed_row_is_refused_naming_the_file_the_technique_and_the_field(malformed):
    change, message = MALFORMED[malformed]
    with pytest.raises(RowError, match="^results.json: ") as caught:
        Row.from_dict({**GOOD, **change}, "results.json")
    assert message in str(caught.value)
    if change.get("technique", "act") is not None:
        assert "technique 'act'" in str(caught.value)


# ----------------------------------------------------------------------------- one Pareto front

points = st.lists(st.tuples(st.floats(0.1, 10), st.floats(-0.1, 0.5)), min_size=1, max_size=20)


def dominates(q, p):
    return q[0] >= p[0] and q[1] <= p[1] and q != p


@given(points)
def test_the_front_holds_exactly_the_points_no_other_dominates_ordered_by_speedup(pts):
    front = pareto_front(pts)
    assert set(front) == {i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)}
    assert [pts[i] for i in front] == sorted(pts[i] for i in front)


@given(points)
def test_the_tuner_and_the_report_draw_the_same_front_in_the_same_order(pts):
    # There were two front functions, sorting by speedup one way in the tuner and the other
    # way in the report.
    trials = [{"number": i, "state": "COMPLETE",
               "figures": {"wall_speedup": s, "quality_delta": q}} for i, (s, q) in enumerate(pts)]
    assert [t["number"] for t in tune.trial_front(trials)] == pareto_front(pts)
    assert report.pareto_front is pareto_front


# ----------------------------------------------------------------------------- one cumulative

NAMES = [name for name in techniques() if name != REFERENCE]


@given(st.fixed_dictionaries({name: st.tuples(st.floats(0.2, 5), st.floats(-0.02, 0.2))
                              for name in NAMES}))
def test_the_asv_cumulative_benchmark_times_the_technique_the_record_names(figures):
    # The asv suite timed the combined model whatever its quality; the records counted it only
    # within the quality budget.
    def seen(delta: float) -> float:  # the delta the gate computes from the evaluations below
        return math.exp(math.log1p(delta)) - 1

    rows = [Row(name, "tiny", speed, reference_perplexity=1.0,
                candidate_perplexity=1.0 + seen(delta), quality_delta=seen(delta),
                counts=TARGET.counts(seen(delta))) for name, (speed, delta) in figures.items()]
    record = baselines.make_record(rows, {"scale": "tiny"}, TARGET, "c")
    timed = []
    speeds = {name: Speedup((speed,), 1.0, 1 / speed) for name, (speed, _) in figures.items()}
    speeds[REFERENCE] = Speedup((1.0,), 1.0, 1.0)

    def measure(name):
        timed.append(name)
        return speeds[name]

    def evaluate(model, corpus, max_batches):
        kind, name = model
        return Evaluation("test", 0.0 if kind == "reference" else math.log1p(figures[name][1]),
                          1)

    bench = SimpleNamespace(candidate=lambda name: ("candidate", name),
                            reference=lambda name: ("reference", name), corpus=None,
                            setup=SimpleNamespace(quality_batches=1), target=TARGET)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gate, "evaluate", evaluate)
        speed = gate.measure_cumulative(bench, 1, measure=measure)
    source = record["cumulative"]["source"]
    assert speed is speeds[source if source in figures else REFERENCE]
    assert speed.speedup == record["cumulative"]["speedup"]
    assert len(timed) == len(set(timed)), "each technique is timed at most once"


def test_the_asv_suite_reports_the_shared_cumulative_measurement(monkeypatch):
    # asv installs the package as a wheel, without baselines/: the suite passes the quality
    # budget of the repository it runs from (a default Target.load() failed there).
    import suites.bench_techniques as suite

    expected = baselines.Target.load(Path(suite.__file__).resolve().parent.parent / "baselines")
    monkeypatch.setattr(gate, "bench", lambda cache, target: ("bench of", cache)
                        if target == expected else None)
    monkeypatch.setattr(gate, "measure_cumulative",
                        lambda b, passes: Speedup((4.0,), 1.0, 0.25) if b == ("bench of", "c")
                        else None)
    assert suite.Cumulative().track_cumulative_time_ratio("c") == 0.25
