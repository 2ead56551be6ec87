"""The command as a new user meets it: fast help, discoverable knobs, bad values refused before
anything trains, and console tables that cannot be misread."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import bench.pipeline
from bench import console
from bench.baselines import Target
from bench.cli import PLUGINS, main
from bench.figures import place_labels, pyplot, speed_points
from bench.pipeline import Bench, Setup
from bench.registry import techniques
from bench.tokens import passage_stats

ROOT = Path(__file__).resolve().parent.parent
TARGET = Target(cumulative_speedup=10.0, quality_budget=0.05, stretch_quality_budget=0.01,
                check_tolerance=0.1)
COMMANDS = ["run", "train", "techniques", "measure", "sweep", "baseline", *PLUGINS]
# Their options are declared from constants of modules that import torch (the gate's training
# steps, the routing cache's presets); their --help still imports it.
HEAVY_HELP = {"calibrate", "ceilings", "routing-stats"}


# ---------------------------------------------------------------------------------------------
# Help


def modules_after_help(*argv: str) -> set[str]:
    """The modules imported by ``bk-bench ARGV --help``, in a fresh interpreter."""
    code = ("import contextlib, io, sys\nfrom bench.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(sys.argv[1:] + ['--help'])\n"
            "    except SystemExit as done:\n        assert done.code == 0, done.code\n"
            "print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return set(out.stdout.split())


@pytest.mark.parametrize("command", [None, *(c for c in COMMANDS if c not in HEAVY_HELP)])
def test_help_answers_without_importing_torch(command):
    loaded = modules_after_help(*([command] if command else []))
    assert "bench.cli" in loaded
    assert not {"torch", "bench.pipeline", "bench.registry"} & loaded


def test_help_lists_every_command_and_says_where_the_knobs_are(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)
    assert "bk-bench techniques" in out
    for command in ("measure", "sweep", "tune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "bk-bench techniques" in " ".join(capsys.readouterr().out.split()), command


def test_techniques_lists_each_knob_with_its_type_valid_values_default_and_help(capsys):
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    for name, technique in techniques().items():
        assert f"{name}: " in text
        for knob in technique.knobs:
            described = (f"{knob.name} ({knob.kind.__name__}, default {knob.default}): "
                         f"{knob.describe()}")
            assert described in text, described
            assert " ".join(knob.help.split()) in text, knob.help
    assert max(len(line) for line in out.splitlines()) <= console.WIDTH


def test_techniques_of_an_unknown_name_is_a_usage_error(capsys):
    assert main(["techniques", "act", "nope"]) == 2
    assert "unknown technique 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad values are refused before anything trains


class Trained(Exception):
    """Raised by the patched training loop: the command trained before refusing."""


@pytest.fixture
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise Trained("a model was trained before the bad input was refused")

    monkeypatch.setattr(bench.pipeline, "train", train)


SETUP = ["--quick", "--corpus", "synthetic", "--steps", "2", "--no-progress"]
REFUSED = {
    "a value that is not a number": (["measure", "act", "--knob", "act_threshold=abc"],
                                     r"knob act_threshold: expected a number in \[0, 1\], "
                                     r"got 'abc'"),
    "a sweep whose last value is out of range": (
        ["sweep", "act", "--knob", "act_threshold=0.5,-1"],
        r"knob act_threshold: expected a number in \[0, 1\], got -1"),
    "a sweep over a knob the technique lacks": (["sweep", "act", "--knob", "depth=1,2"],
                                               r"has no knob 'depth'"),
    "a fixed knob out of range": (["sweep", "act", "--knob", "act_threshold=0.9",
                                   "--set", "act_lambda=-2"], r"knob act_lambda: expected"),
    "knobs that contradict each other": (["measure", "cond_moe", "--knob", "k_min=2", "--knob",
                                          "k_max=1"], r"knob k_min: expected at most k_max"),
    "an integer knob given a fraction": (["measure", "multiscale", "--knob", "factor=2.5"],
                                         r"knob factor: expected an integer"),
    "an unknown technique in a run": (["run", "--techniques", "act", "nope"],
                                      r"unknown technique 'nope'"),
    "an unknown technique in a baseline check": (
        ["baseline", "check", "--techniques", "nope"], r"unknown technique 'nope'"),
    "a tuning value out of range": (["tune", "act", "--method", "grid", "--values",
                                     "act_threshold=0.9,1.5"],
                                    r"knob act_threshold: expected a number in \[0, 1\], "
                                    r"got 1.5"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_knob_or_technique_is_refused_before_anything_trains_naming_it(
        case, no_training, tmp_path, capsys):
    argv, message = REFUSED[case]
    assert main([*argv, *SETUP, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bk-bench {argv[0]}: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "checkpoints").exists() or not any(
        p.suffix == ".pt" for p in (tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("argv", [
    ["techniques", "--nope"],
    ["sweep", "act", "--knob", "act_threshold"],
    ["measure"],
    ["tune"],
])
def test_every_usage_error_exits_2_on_one_line(capsys, argv):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bk-bench"), err


# ---------------------------------------------------------------------------------------------
# The console table


def row(name, wall, q1, q3, delta, noisy=False, **extra):
    return {"technique": name, "wall_speedup": wall, "wall_q1": q1, "wall_q3": q3,
            "flops_speedup": 1.2, "work_ratio": 0.8, "quality_delta": delta,
            "noise_warning": "noisy: ..." if noisy else None, **extra}


figures = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(1e-6, 1e9))
names = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=60)
rows = st.lists(st.builds(row, names, figures, figures, figures, figures, st.booleans(),
                          mean_layers_per_token=figures,
                          **{"mean_a_very_long_statistic_name_indeed": figures}),
                min_size=1, max_size=12)


@given(rows, st.floats(0, 10))
def test_the_table_fits_100_columns_and_flags_every_row_it_should(table_rows, budget):
    target = Target(10.0, budget, 0.01, 0.1)
    text = console.table(table_rows, target.counts, budget)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= console.WIDTH
    assert len(lines) == 1 + len(table_rows)
    for line, r in zip(lines[1:], table_rows, strict=True):
        assert ("NOISY" in line) == (r["noise_warning"] is not None)
        delta = console.number(r["quality_delta"])
        verdict = "n/a" if delta is None else ("yes" if target.counts(delta) else "no")
        assert line.split()[-1] == verdict
    stats = console.stats_table(table_rows)
    assert max(len(line) for line in stats.splitlines()) <= console.WIDTH


def test_the_table_shows_the_audited_rows_as_a_reader_needs_them():
    text = console.table([row("dense", 1.0, 0.98, 1.03, 0.0),
                          row("act", 0.90, 0.87, 1.06, 0.016, noisy=True),
                          row("sparsity", 1.15, 1.09, 1.23, 0.562)], TARGET.counts, 0.05)
    header, dense, act, sparsity = text.splitlines()
    assert "wall speedup (IQR)" in header and "in budget?" in header
    assert "1.00x (0.98-1.03)" in dense and dense.endswith("yes") and "NOISY" not in dense
    assert "0.90x (0.87-1.06)" in act and "21% NOISY" in act and act.endswith("yes")
    assert "+56.2%" in sparsity and sparsity.endswith("no")
    assert "True" not in text and "False" not in text


@given(st.floats(0.01, 1.0), st.sampled_from(["dense (no technique within budget is faster)",
                                              "combined", "act"]))
@example(1.0, "act")  # a technique exactly as fast as the dense model is no progress
def test_the_headline_never_reads_no_speedup_as_progress(speed, source):
    text = console.headline({"speedup": speed, "source": source}, 10.0, 0.05)
    assert f"{speed:.2f}x" in text and "target 10x" in text
    assert "no technique" in text or "no faster than the dense model" in text
    assert "%" not in text.replace("+5%", "")  # no share of the target


def test_the_headline_of_a_real_speedup_says_its_source_and_what_is_left():
    text = console.headline({"speedup": 2.0, "source": "act"}, 10.0, 0.05)
    assert text == ("cumulative speedup 2.00x (act, within the +5% quality budget); target 10x, "
                    "5x still to go")


def test_the_run_summary_counts_the_noisy_rows_and_says_where_the_report_is():
    results = {"rows": [row("dense", 1.0, 0.98, 1.03, 0.0), row("act", 0.9, 0.8, 1.0, 0.01, True)],
               "record": {"cumulative": {"speedup": 1.0, "source": "dense (no technique ...)"},
                          "quality": {"dense_test_bits": 2.1, "dense_test_perplexity": 4.3,
                                      "unigram_test_bits": 4.5, "bigram_test_bits": 3.4}}}
    text = console.run_summary(results, TARGET, 0.10, "full report: runs/report/index.html")
    words = " ".join(text.split())
    assert "1 of 2 rows are NOISY" in words
    assert "cumulative speedup 1.00x: no technique within the +5% quality budget" in words
    assert text.rstrip().endswith("full report: runs/report/index.html")
    assert max(len(line) for line in text.splitlines()) <= console.WIDTH
    assert "every technique ran at its default knobs" in words


def test_the_run_summary_and_the_figure_titles_name_the_knobs_a_run_set():
    results = {"rows": [row("dense", 1.0, 0.98, 1.03, 0.0)],
               "record": {"cumulative": {"speedup": 1.0, "source": "dense"},
                          "setup": {"scale": "small", "knobs": {"mod": {"capacity": 0.25},
                                                               "act": {"act_lambda": 0.1}}}}}
    words = " ".join(console.run_summary(results, TARGET, 0.10, "report").split())
    assert ("knobs set: mod capacity=0.25; act act_lambda=0.1; every other knob at its default"
            in words) and "every technique ran at its default knobs" not in words
    title = console.setup_title(results["record"]["setup"])
    assert title.startswith("scale small") and title.endswith("mod capacity=0.25; act "
                                                              "act_lambda=0.1")


def test_the_axes_table_gives_each_axis_its_speed_factor_and_quality_cost_in_points():
    # all on: 2.4x at +30%; without depth 1.6x at +10%: depth adds 2.4 / 1.6 = 1.5x for 20 points
    record = {"techniques": {"combined": row("combined", 2.4, 2.3, 2.5, 0.30)},
              "axes": {"combined": {"depth": row("combined", 1.6, 1.5, 1.7, 0.10),
                                    "positions": row("combined", 3.0, 2.9, 3.1, 0.35)}}}
    lines = console.axes_table(record).splitlines()
    assert lines[0].startswith("combined without") and "the axis: speed" in lines[0]
    assert lines[1].split() == ["depth", "1.60x", "(1.50-1.70)", "+10.0%", "1.50x", "+20.0",
                                "points"]
    assert lines[2].split() == ["positions", "3.00x", "(2.90-3.10)", "+35.0%", "0.80x", "-5.0",
                                "points"]
    assert max(len(line) for line in lines) <= console.WIDTH
    assert console.axes_table({"techniques": {}}) == ""


# ---------------------------------------------------------------------------------------------
# The figure's inputs


def test_speed_points_judge_the_budget_by_the_rule_and_skip_rows_without_a_speedup():
    points = speed_points([row("a", 1.2, 1.1, 1.3, 0.05), row("b", 1.5, 1.4, 1.6, 0.0501, True),
                           row("c", 1.0, None, None, None), row("d", math.nan, 1, 1, 0.0)],
                          TARGET.counts)
    assert [(p.name, p.counts, p.noisy) for p in points] == [
        ("a", True, False), ("b", False, True), ("c", None, False)]


@given(st.lists(st.tuples(st.floats(-2, 60), st.floats(0.3, 20)), min_size=1, max_size=12))
def test_figure_labels_never_overlap(anchors):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    try:
        ax.set_yscale("log")
        ax.set_xlim(-3, 70)
        ax.set_ylim(0.2, 30)
        texts = [f"technique {i} (over budget)" for i in range(len(anchors))]
        offsets = place_labels(ax, anchors, texts)
        scale = fig.dpi / 72
        boxes = []
        for (x, y), (dx, dy), text in zip(anchors, offsets, texts, strict=True):
            px, py = ax.transData.transform((x, y))
            left = px + dx * scale
            boxes.append((left, left + 0.6 * 8 * scale * len(text), py + dy * scale))
        height = 1.5 * 8 * scale
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not (a[0] < b[1] and b[0] < a[1] and abs(a[2] - b[2]) < height - 1e-6)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Where the compute goes


def test_the_token_view_is_the_timed_text_with_one_value_per_token_and_statistic(tmp_path):
    setup = Setup.quick(corpus="synthetic", steps=0, output=tmp_path, progress=False)
    bench = Bench(setup)
    view = passage_stats(bench, ["dense", "act"], tokens=200)
    window = setup.seq_len
    assert view["window"] == window and len(view["tokens"]) == 2 * window  # whole windows
    first = bench.workload.batches[0][:2].reshape(-1)
    assert view["tokens"] == [bench.corpus.vocab.tokens[i] for i in first.tolist()]
    assert bench.corpus.vocab.decode(first) == "".join(view["tokens"])
    n_layers = bench.dense().cfg.n_layers
    assert view["n_layers"] == n_layers
    assert view["techniques"]["dense"]["layers_per_token"] == [float(n_layers)] * (2 * window)
    act = view["techniques"]["act"]
    assert all(len(values) == 2 * window for values in act.values())
    assert all(0 < v <= n_layers for v in act["layers_per_token"])
