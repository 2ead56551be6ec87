"""The HTML report: built from small fabricated inputs, checked as files and in headless
Chromium."""

import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import gate
from bench.cli import main
from bench.files import dump_json
from bench.report import (
    AsvChange,
    Inputs,
    TokenView,
    asv_threshold,
    build,
    external_hosts,
    load_results,
    load_tuning,
    pareto_front,
    section_axes,
    section_realisation,
    shaded_passage,
)

PNG = b"\x89PNG\r\n\x1a\n"
IMAGES = ["asv-0-bench_core.png", "asv-0-bench_model.png", "asv-0-bench_techniques.png",
          "cumulative-tiny.png", "pareto-0.png", "realisation-tiny.png", "speed_quality.png",
          "techniques.png"]
TARGET = {"cumulative_speedup": 10.0, "quality_budget": 0.05, "stretch_quality_budget": 0.01,
          "check_tolerance": 0.10}
EVIL = "<script>alert(1)</script>&moe"


# ---------------------------------------------------------------------------------------------
# Fabricated inputs


def row(name, wall, q1, q3, flops, work, delta, **extra):
    return {"technique": name, "knobs": extra.pop("knobs", ""), "wall_speedup": wall,
            "wall_q1": q1, "wall_q3": q3, "flops_speedup": flops, "work_ratio": work,
            "quality_delta": delta, "counts": delta is not None and delta <= 0.05,
            "noise_warning": extra.pop("noise_warning", None), **extra}


def write_results(path, rows):
    record = {"schema": 1, "commit": "a" * 40, "date": "2026-11-23T12:00:00+00:00",
              "machine": {"cpu": "test cpu"}, "setup": {"corpus": "shakespeare", "steps": 300},
              "techniques": {}, "cumulative": {"speedup": 1.4, "counts": True, "source": "act"},
              "quality": {"dense_test_bits": 2.1, "dense_test_perplexity": 4.3,
                          "unigram_test_bits": 4.5, "bigram_test_bits": 3.4}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_json({"record": record, "rows": rows}))
    return path


PASSAGE = "To be, or not <to> be:\nthat is the question & more."
WINDOW = 16


def layers_of(i):
    """ACT's fabricated layers per token: 1 to 4, so every shade from light to dark occurs."""
    return float(1 + i % 4)


def write_tokens(path, techniques=None):
    tokens = list(PASSAGE)
    n = len(tokens)
    techniques = techniques or {
        "dense": {"layers_per_token": [4.0] * n},
        "act": {"layers_per_token": [layers_of(i) for i in range(n)]},
        EVIL: {"layers_per_token": [0.0] * n, "exit_layer": [2.0] * n},
    }
    path.write_text(json.dumps({"schema": 1, "corpus": "shakespeare", "level": "char",
                                "window": WINDOW, "n_layers": 4, "tokens": tokens,
                                "techniques": techniques}))
    return path


def write_baselines(root, speedups):
    (root / "records").mkdir(parents=True)
    (root / "target.json").write_text(json.dumps(TARGET))
    for i, (speed, counts) in enumerate(speedups):
        commit = f"{i:x}" * 40
        rec = {"schema": 1, "commit": commit[:40], "date": f"2026-11-{10 + i}T12:00:00+00:00",
               "techniques": {}, "cumulative": {"speedup": speed, "counts": counts,
                                                "source": "act"}}
        (root / "records" / f"2026111{i}-{commit[:10]}.json").write_text(json.dumps(rec))
    return root


def write_tuning(folder, trials):
    folder.mkdir(parents=True)
    (folder / "optimization_results.json").write_text(json.dumps(
        {"study": "tune-act", "trials": trials, "pareto_front": []}))
    (folder / "best_config.json").write_text(json.dumps(
        {"technique": "act", "feasible": True, "trial": 2, "knobs": {"act_threshold": 0.9},
         "figures": {"wall_speedup": 1.6, "quality_delta": 0.02}, "max_degradation": 0.05}))
    return folder


def asv_result(commit, date, values):
    """A result file in asv 0.6's format (api_version 2): one row per benchmark."""
    return {"version": 2, "commit_hash": commit, "env_name": "virtualenv-py3.11", "date": date,
            "params": {"machine": "box", "python": "3.11"}, "python": "3.11",
            "requirements": {}, "env_vars": {},
            "result_columns": ["result", "params", "version", "started_at", "duration"],
            "results": {name: [value, params, "v1", date, 1.0]
                        for name, (value, params) in values.items()},
            "durations": {}}


ASV_BENCHMARKS = {
    "bench_core.time_forward": {"name": "bench_core.time_forward", "type": "time",
                                "unit": "seconds", "params": [["64", "128", "256"]],
                                "param_names": ["n"], "version": "v1"},
    "bench_techniques.Technique.track_time_ratio": {
        "name": "bench_techniques.Technique.track_time_ratio", "type": "track",
        "unit": "t_candidate / t_dense", "params": [], "param_names": [], "version": "v1"},
    "bench_model.time_train_step": {"name": "bench_model.time_train_step", "type": "time",
                                    "unit": "seconds", "params": [], "param_names": [],
                                    "version": "v1"},
}


def write_asv_results(results_dir, commits):
    """Two commits: n=64 slows down 1.5x, n=128 moves 10% (noise), n=256 is skipped (NaN), the
    ratio improves, and the train step starts failing."""
    machine = results_dir / "box"
    machine.mkdir(parents=True)
    (machine / "machine.json").write_text(json.dumps(
        {"machine": "box", "arch": "x86_64", "cpu": "test", "num_cpu": "2", "os": "Linux",
         "ram": "1", "version": 1}))
    (results_dir / "benchmarks.json").write_text(json.dumps({**ASV_BENCHMARKS, "version": 2}))
    old, new = commits
    p = [["64", "128", "256"]]
    nan = float("nan")
    runs = [(old, 1_700_000_000_000, {"bench_core.time_forward": ([0.010, 0.020, nan], p),
                                      "bench_techniques.Technique.track_time_ratio": ([0.80], []),
                                      "bench_model.time_train_step": ([0.5], [])}),
            (new, 1_700_000_100_000, {"bench_core.time_forward": ([0.015, 0.022, nan], p),
                                      "bench_techniques.Technique.track_time_ratio": ([0.60], []),
                                      "bench_model.time_train_step": (None, [])})]
    for commit, date, values in runs:
        (machine / f"{commit[:8]}-virtualenv-py3.11.json").write_text(
            json.dumps(asv_result(commit, date, values)))
    return results_dir


ASV_CONFIG = """{
    // commented, as the project's is
    "version": 1, "project": "t", "repo": ".", "branches": ["main"], "dvcs": "git",
    "environment_type": "virtualenv", "pythons": ["3.11"],
    "results_dir": "results", "html_dir": "html",
    "regressions_thresholds": {".*track_.*time_ratio.*": 0.05, ".*": 0.25}
}
"""


@pytest.fixture
def inputs(tmp_path):
    return make_inputs(tmp_path)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report from the fabricated inputs (with a published asv page), shared by the tests
    that only read it."""
    root = tmp_path_factory.mktemp("shared")
    inputs = make_inputs(root)
    inputs.asv_html.mkdir(parents=True)
    (inputs.asv_html / "index.html").write_text("<!doctype html><title>asv</title>")
    return build(inputs, root / "report")


def make_inputs(tmp_path):
    rows = [row("dense", 1.0, 0.98, 1.02, 1.0, 1.0, 0.0),
            row("act", 1.6, 1.5, 1.7, 1.8, 0.55, 0.021, knobs="act_threshold=0.9",
                mean_layers_per_token=1.65),
            row(EVIL, 1.05, 0.9, 1.3, 3.2, 0.31, 0.084, noise_warning="noisy: IQR 38%"),
            row("seqlen", 1.2, 1.1, 1.3, None, None, None)]
    trials = [{"number": i, "state": "COMPLETE", "knobs": {"act_threshold": t},
               "figures": {"wall_speedup": s, "quality_delta": d}, "feasible": d <= 0.05}
              for i, (t, s, d) in enumerate([(0.5, 2.1, 0.09), (0.8, 1.8, 0.04), (0.9, 1.6, 0.02),
                                             (0.95, 1.2, 0.03), (0.99, 1.1, 0.001)])]
    trials.append({"number": 5, "state": "FAIL", "knobs": {"act_threshold": 0.7}})
    (tmp_path / "asv.conf.json").write_text(ASV_CONFIG)
    write_tokens(write_results(tmp_path / "runs" / "results.json", rows).parent / "tokens.json")
    return Inputs(
        results=tmp_path / "runs" / "results.json",
        baselines=write_baselines(tmp_path / "baselines",
                                  [(1.0, True), (1.3, True), (2.4, False), (1.5, True)]),
        tunings=(write_tuning(tmp_path / "tune-act", trials),),
        asv_results=write_asv_results(tmp_path / "asv" / "results", ["1" * 40, "2" * 40]),
        asv_html=tmp_path / "asv" / "html", asv_config=tmp_path / "asv.conf.json")


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "a":
            self.links.append(a["href"])
        if tag in ("script", "iframe", "object", "embed") or (
                tag == "link" and not a.get("href", "").startswith("data:")):
            self.scripts.append(a)

    def handle_data(self, data):
        self.text.append(data)


def parse(page):
    p = PageParser()
    p.feed(page.read_text(encoding="utf-8"))
    return p


# ---------------------------------------------------------------------------------------------
# Files


def test_report_writes_index_and_every_image_it_shows(report):
    index = report
    page = parse(index)
    srcs = [img["src"] for img in page.images]
    assert sorted(srcs) == IMAGES
    for img in page.images:
        assert (index.parent / img["src"]).read_bytes().startswith(PNG)
        assert len(img.get("alt", "")) > 20
    assert not page.scripts, "the page must have no scripts or external resources"
    assert not [p for p in index.parent.iterdir() if p.name.startswith(".")], \
        "temporary files left behind"


def test_every_link_on_the_page_is_relative_and_points_at_an_existing_file(report):
    index = report
    links = parse(index).links
    assert "../asv/html/index.html" in links and "../runs/results.json" in links
    for href in links:
        assert not re.match(r"^[a-z]+:|^/", href), f"absolute link {href}"
        if not href.startswith("#"):
            assert (index.parent / href).is_file(), href


def test_every_technique_appears_in_the_table_with_its_measured_figures(report):
    text = " ".join(parse(report).text)
    for figure in ("1.60x", "1.50 - 1.70", "1.80x", "0.550", "+2.10%", "1.650", "+8.40%",
                   "3.05", "noisy: IQR 38%", "counted savings do not reach the clock"):
        assert figure in text, figure
    assert "Honesty check" in text and "A/A" in text


def test_html_special_characters_in_inputs_are_escaped(report):
    page = report.read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;moe" in page


def test_missing_inputs_are_explained_with_the_command_that_makes_them(tmp_path):
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "target.json").write_text(json.dumps(TARGET))
    empty = Inputs(None, tmp_path / "baselines", (), tmp_path / "none", tmp_path / "none",
                   tmp_path / "none.json")
    index = build(empty, tmp_path / "report")
    text = " ".join(parse(index).text)
    for command in ("bk-bench run", "bk-bench tune", "bk-bench baseline record", "asv publish",
                    "asv run"):
        assert command in text, command
    assert parse(index).images == []


def test_the_tuning_section_lists_the_pareto_front_and_the_best_configuration(report):
    page = report.read_text()
    tuning = page[page.index('id="tuning"'):page.index('id="cumulative"')]
    front = re.findall(r"<tr class=\"\"><td>(\d+)</td>", tuning)
    assert front == ["4", "2", "1", "0"]  # trial 3 (1.2x at +3%) is dominated by trial 2
    assert "act_threshold=0.9, wall speedup 1.60x, ppl delta +2.00%" in tuning
    assert "1 not shown" in tuning  # the failed trial


def test_a_tuning_folder_takes_its_allowed_degradation_from_the_tuner(tmp_path):
    folder = tmp_path / "tune"
    folder.mkdir()
    (folder / "optimization_metadata.json").write_text(json.dumps(
        {"settings": {"technique": "act", "max_degradation": 0.01}}))
    (folder / "optimization_results.json").write_text(json.dumps({"trials": [
        {"number": 0, "state": "COMPLETE", "knobs": {"t": 1}, "figures": {
            "wall_speedup": 1.5, "quality_delta": 0.02}}]}))
    t = load_tuning(folder, budget=0.05)
    assert t.technique == "act" and t.budget == 0.01
    assert [(x.speedup, x.feasible, x.knobs) for x in t.trials] == [(1.5, False, {"t": 1})]


def test_a_tuning_folder_names_the_split_its_trials_were_scored_on(tmp_path):
    folder = tmp_path / "tune"
    folder.mkdir()
    assert load_tuning(folder, 0.05).split == "test"  # folders from before the option
    (folder / "optimization_metadata.json").write_text(json.dumps(
        {"settings": {"technique": "act"}, "setup": {"quality_split": "valid"}}))
    assert load_tuning(folder, 0.05).split == "valid"


def test_a_tuning_folder_without_results_is_reported_not_fatal(tmp_path):
    (tmp_path / "tune").mkdir()
    t = load_tuning(tmp_path / "tune", 0.05)
    assert t.trials == [] and "optimization_results.json not found" in t.problem
    with pytest.raises(ValueError, match="does not exist"):
        load_tuning(tmp_path / "absent", 0.05)


def test_a_nan_speedup_is_rejected_with_the_file_and_technique_named(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"record": {}, "rows": [{"technique": "act", "wall_speedup": NaN}]}')
    with pytest.raises(ValueError, match=r"results.json: technique 'act' wall_speedup is nan"):
        load_results(path)


def test_an_iqr_that_excludes_the_median_is_rejected(tmp_path):
    path = write_results(tmp_path / "results.json", [row("act", 2.0, 1.0, 1.5, 2.0, 0.5, 0.0)])
    with pytest.raises(ValueError, match="does not contain the median"):
        load_results(path)


def _results(tmp, change):
    path = write_results(tmp / "runs" / "results.json", [row("act", 2.0, 1.8, 2.2, 2.5, 0.5, 0.0)])
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _tuning(tmp, file, change):
    folder = write_tuning(tmp / "tune", [{"number": 0, "state": "COMPLETE", "knobs": {"a": 1},
                                          "figures": {"wall_speedup": 1.5,
                                                      "quality_delta": 0.01}}])
    (folder / "optimization_metadata.json").write_text(json.dumps(
        {"settings": {"technique": "act", "max_degradation": 0.05}}))
    data = json.loads((folder / file).read_text())
    change(data)
    (folder / file).write_text(json.dumps(data))
    return folder / file


# Malformed inputs that once ended in a traceback (found by mutating every field of each file).
MALFORMED = {
    "cumulative as text": lambda t: _results(t, lambda d: d["record"].update(cumulative="1x")),
    "cumulative without speedup": lambda t: _results(
        t, lambda d: d["record"]["cumulative"].pop("speedup")),
    "machine as text": lambda t: _results(t, lambda d: d["record"].update(machine="box")),
    "setup as a list": lambda t: _results(t, lambda d: d["record"].update(setup=[1])),
    "a quality figure as text": lambda t: _results(
        t, lambda d: d["record"]["quality"].update(dense_test_bits="2.1")),
    "a trial number as a list": lambda t: _tuning(
        t, "optimization_results.json", lambda d: d["trials"][0].update(number=[0])),
    "knobs as a list": lambda t: _tuning(
        t, "optimization_results.json", lambda d: d["trials"][0].update(knobs=[1])),
    "best knobs as text": lambda t: _tuning(t, "best_config.json",
                                            lambda d: d.update(knobs="a=1")),
    "settings as text": lambda t: _tuning(t, "optimization_metadata.json",
                                          lambda d: d.update(settings="act")),
}


@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_a_malformed_input_is_one_line_naming_its_file_never_a_traceback(tmp_path, capsys,
                                                                         malformed):
    path = MALFORMED[malformed](tmp_path)
    args = ["report", "--baselines", str(tmp_path / "none"), "--asv-results",
            str(tmp_path / "asv"), "--output", str(tmp_path / "out")]
    if path.name == "results.json":
        args += ["--results", str(path)]
    else:
        args += ["--tuning", str(path.parent)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bk-bench report: error: ")
    assert str(path) in err


def section(page, key):
    """The HTML of one section of the page."""
    text = page.read_text()
    start = text.index(f'<section id="{key}">')
    return text[start:text.index("</section>", start)]


def test_the_page_opens_with_the_headline_and_the_speed_against_quality_figure(report):
    summary = section(report, "summary")
    text = " ".join(" ".join(parse_html(summary).text).split())
    assert ("cumulative speedup 1.40x (act, within the +5% quality budget); target 10x, 7.1x "
            "still to go (this run)") in text
    assert [img["src"] for img in parse(report).images][0] == "speed_quality.png"
    assert "1 of 4 rows are noisy" in text
    assert f"Over the budget, so not counted however fast: {EVIL}" in text
    assert "A/A" in text


def test_the_cumulative_headline_never_reads_no_speedup_as_progress(tmp_path):
    root = write_baselines(tmp_path / "baselines", [(1.3, True)])
    latest = {"schema": 1, "commit": "f" * 40, "date": "2026-11-30T12:00:00+00:00",
              "techniques": {}, "cumulative": {
                  "speedup": 1.0, "counts": True,
                  "source": "dense (no technique within budget is faster)"}}
    (root / "records" / "20261130-ffffffffff.json").write_text(json.dumps(latest))
    index = build(Inputs(None, root, (), tmp_path / "none", tmp_path / "none",
                         tmp_path / "none.json"), tmp_path / "report")
    text = " ".join("".join(parse(index).text).split())
    headline = ("cumulative speedup 1.00x: no technique within the +5% quality budget is faster "
                "than the dense model; target 10x")
    assert f"{headline} (the latest record, ffffffffff)" in text  # the opening
    assert f"Latest record (ffffffffff): {headline}." in text  # the history
    assert "of the 10x target" not in text and "(10%)" not in text


def test_the_history_says_whether_each_record_fine_tuned_or_trained_from_scratch(tmp_path):
    root = write_baselines(tmp_path / "baselines", [(1.3, True), (2.0, True), (2.5, False)])
    for path, start in zip(sorted((root / "records").glob("*.json")), (None, "dense", "scratch"),
                           strict=True):
        rec = json.loads(path.read_text())
        if start is not None:  # the first record predates the setting
            rec["setup"] = {"start": start}
        path.write_text(json.dumps(rec))
    index = build(Inputs(None, root, (), tmp_path / "none", tmp_path / "none",
                         tmp_path / "none.json"), tmp_path / "report")
    rows = [" ".join(r.split()) for r in section(index, "cumulative")
            .split("<tr")[2:]]
    assert ["fine-tuned from dense" in r for r in rows] == [True, True, False]
    assert ["trained from scratch" in r for r in rows] == [False, False, True]

    rec = json.loads(path.read_text())
    rec["setup"] = {"start": "halfway"}
    path.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="setup start 'halfway' is not one of dense, scratch"):
        build(Inputs(None, root, (), tmp_path / "none", tmp_path / "none",
                     tmp_path / "none.json"), tmp_path / "report")


def parse_html(html):
    p = PageParser()
    p.feed(html)
    return p


class SpanParser(HTMLParser):
    """The shaded spans of a passage: (class, title, text) each."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "span" and dict(attrs).get("class", "").startswith("s"):
            self._open = [dict(attrs)["class"], dict(attrs).get("title", ""), ""]

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data


def passages(html):
    """Each shaded passage (a ``tokens`` div) as its spans."""
    found = []
    for chunk in html.split("<div class=tokens>")[1:]:
        p = SpanParser()
        p.feed(chunk[:chunk.index("</div>")])
        found.append(p.spans)
    return found


def test_each_token_is_shaded_by_the_work_it_received(report):
    html = section(report, "tokens")
    heads = re.findall(r"<h3>(.*?) <small>", html)
    assert heads == ["dense", "act", html_escape(EVIL)]  # in the order of the results table
    dense, act, evil, evil_exit = passages(html)
    shown = PASSAGE.replace("\n", "\u21b5\n")
    for spans in (dense, act, evil, evil_exit):
        assert "".join(text for _, _, text in spans) == shown  # every token, in order
    assert {c.split()[0] for c, _, _ in dense} == {"s10"}  # all 4 of 4 layers: the darkest
    assert [c for c, _, _ in dense] == ["s10", "s10 w", "s10 w", "s10 w"]  # a run per window
    assert {c.split()[0] for c, _, _ in evil} == {"s0"}
    position = 0
    for klass, title, text in act:  # one span per token here: neighbours differ
        assert len(text.replace("\u21b5", "")) == 1
        value = layers_of(position)
        assert klass.split()[0] == f"s{round(10 * value / 4)}" and title == f"layers run {value:g}"
        assert ("w" in klass.split()) == (position > 0 and position % WINDOW == 0)
        position += 1
    assert "exit layer" in html and "&lt;" in html and "&amp;" in html and "<to>" not in html


def html_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@given(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 4.0]), st.floats(0, 8)), min_size=1,
                max_size=80), st.integers(1, 20))
def test_a_shaded_passage_keeps_every_token_and_its_value(values, window):
    tokens = [chr(97 + i % 26) for i in range(len(values))]
    view = TokenView(None, tokens, "char", window, 8, {"t": {"layers_per_token": values}})
    spans = passages(shaded_passage(view, "layers_per_token", values))[0]
    assert "".join(text for _, _, text in spans) == "".join(tokens)
    position = 0
    for klass, title, text in spans:
        run = values[position:position + len(text)]
        assert len(set(run)) == 1 and title == f"layers run {run[0]:.3g}"
        assert klass.split()[0] == f"s{round(10 * run[0] / 8)}"
        assert ("w" in klass.split()) == (position > 0 and position % window == 0)
        assert not any((position + k) % window == 0 for k in range(1, len(text)))
        position += len(text)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["techniques"]["act"].update(layers_per_token=[1.0]), "expected a list of"),
    (lambda d: d["techniques"]["act"]["layers_per_token"].__setitem__(0, "x"), "expected a number"),
    (lambda d: d.update(tokens="text"), "is not a bk-bench tokens file"),
    (lambda d: d.update(window=0), "window is 0"),
])
def test_a_malformed_tokens_file_is_one_line_naming_it(tmp_path, capsys, change, message):
    results = write_results(tmp_path / "runs" / "results.json", [row("act", 2, 1.8, 2.2, 2, .5, 0)])
    path = write_tokens(results.parent / "tokens.json")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    assert main(["report", "--results", str(results), "--baselines", str(tmp_path / "none"),
                 "--asv-results", str(tmp_path / "asv"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err


def test_the_asv_history_shows_every_commit_oldest_first(report):
    html = section(report, "asv")
    assert re.search(r"<th>11111111</th><th>22222222</th>", html)
    assert re.search(r"time_forward</td><td>64</td><td>seconds</td><td>0\.01</td><td>0\.015</td>",
                     html)
    assert re.search(r"time_forward</td><td>256</td><td>seconds</td><td>n/a</td><td>n/a</td>",
                     html)  # skipped at both
    assert re.search(r"time_train_step</td><td></td><td>seconds</td><td>0\.5</td><td>n/a</td>",
                     html)  # failing at the newer one


def test_the_report_says_what_the_asv_ratios_measure_against_the_records(report):
    text = " ".join(" ".join(parse_html(section(report, "asv")).text).split())
    assert f"trained for only {gate.STEPS} dense steps" in text
    assert f"timed on {gate.WORKLOAD_BATCHES} test batches, without quality" in text
    assert "The authoritative figures are the records" in text


def test_report_subcommand_writes_the_page_and_rejects_a_missing_results_file(inputs, tmp_path,
                                                                              capsys):
    args = ["report", "--results", str(inputs.results), "--baselines", str(inputs.baselines),
            "--tuning", str(inputs.tunings[0]), "--asv-results", str(inputs.asv_results),
            "--asv-html", str(inputs.asv_html), "--asv-config", str(inputs.asv_config),
            "--output", str(tmp_path / "cli")]
    assert main(args) == 0
    assert (tmp_path / "cli" / "index.html").is_file()
    args[2] = str(tmp_path / "absent.json")
    assert main(args) == 2
    assert "absent.json does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Invariants


points = st.lists(st.tuples(st.floats(0.1, 10), st.floats(-0.1, 0.5)), min_size=1, max_size=30)


def dominates(q, p):
    return q[0] >= p[0] and q[1] <= p[1] and q != p


@given(points)
def test_the_pareto_front_holds_exactly_the_trials_no_other_trial_dominates(pts):
    front = set(pareto_front(pts))
    for i, p in enumerate(pts):
        dominated = any(dominates(q, p) for q in pts)
        assert (i in front) == (not dominated)


@given(points)
def test_the_pareto_front_costs_more_quality_at_every_step_up_in_speedup(pts):
    front = [pts[i] for i in pareto_front(pts)]
    steps = zip(front, front[1:], strict=False)
    assert front and all(a[0] <= b[0] and a[1] <= b[1] for a, b in steps)


@given(st.floats(1e-6, 1e3), st.floats(0.5, 2.0), st.sampled_from([0.05, 0.25]))
def test_asv_status_is_worse_exactly_when_the_ratio_exceeds_one_plus_the_threshold(
        before, ratio, threshold):
    change = AsvChange("b", "", "s", before, before * ratio, threshold)
    assert (change.status == "worse") == (change.ratio > 1 + threshold)
    assert (change.status == "better") == (change.ratio < 1 / (1 + threshold))


def test_asv_threshold_is_the_largest_matching_one_as_asv_publish_decides():
    thresholds = {".*track_.*time_ratio.*": 0.05, ".*": 0.25}
    assert asv_threshold("bench_techniques.Technique.track_time_ratio", thresholds) == 0.25
    assert asv_threshold("x", {"^y": 0.3}) == 0.05


def test_asv_summary_flags_the_slowdown_and_the_new_failure_but_not_noise(report):
    page = report.read_text()
    summary = page[page.index('id="asv"'):]
    first_table = summary[:summary.index("<details>")]
    assert re.search(r"time_forward</td><td>64</td>.*?1\.500</td><td>25%</td><td>worse",
                     first_table)
    assert re.search(r"time_train_step</td><td></td><td>0\.5</td><td>n/a</td><td>n/a</td>"
                     r"<td>25%</td><td>new failure", first_table)
    assert re.search(r"track_time_ratio</td><td></td>.*?0\.750</td><td>25%</td><td>better",
                     first_table)
    assert "time_forward</td><td>128" not in first_table  # +10%: within the threshold
    assert "time_forward</td><td>256" not in first_table  # skipped (NaN) in both commits
    assert "1 worse, 1 better, 1 same, 1 new failure, 1 skipped" in summary


# ---------------------------------------------------------------------------------------------
# In the browser: Chromium driven over its DevTools protocol on a pipe (no extra packages)


class Chromium:
    """Headless Chromium with ``--remote-debugging-pipe``: commands on fd 3, replies on fd 4,
    each a JSON message ending in a NUL byte."""

    def __init__(self, binary, profile):
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()

        def wire():  # dup first: dup2 onto an fd with the same number keeps it close-on-exec
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--window-size=1200,900", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.events = b"", 0, []

    def send(self, method, params=None, session=None, timeout=30):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m, i=self._id: m.get("id") == i, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait(self, matches, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                self.events.append(message)
                if matches(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium exited")
                self._buffer += chunk

    def open(self, url, settle=1.0):
        """Load ``url``; returns (images, problems): every <img> with its natural width, and
        every console error, uncaught exception and failed request."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        start = len(self.events)
        self.session = session
        self.send("Page.navigate", {"url": url}, session)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired"
                  and m.get("sessionId") == session)
        time.sleep(settle)
        images = json.loads(self.send("Runtime.evaluate", {
            "expression": "JSON.stringify([...document.images].map(i => ({src: i.src, "
                          "complete: i.complete, width: i.naturalWidth, alt: i.alt})))",
            "returnByValue": True}, session)["result"]["value"])
        problems = []
        for e in self.events[start:]:
            p = e.get("params", {})
            if e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                problems.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
            elif e.get("method") == "Runtime.consoleAPICalled" and p["type"] == "error":
                problems.append(" ".join(str(a.get("value", a.get("description")))
                                         for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                problems.append(p["exceptionDetails"].get("exception", {}).get(
                    "description", p["exceptionDetails"]["text"]))
        return images, problems

    def evaluate(self, expression):
        """The JSON value of ``expression`` in the page opened last."""
        return json.loads(self.send("Runtime.evaluate", {
            "expression": f"JSON.stringify({expression})", "returnByValue": True},
            self.session)["result"]["value"])

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium not found (apt-get install chromium); browser check of the report "
                    "not run")
    browser = Chromium(binary, tmp_path / "chromium-profile")
    yield browser
    browser.close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Serve a folder on 127.0.0.1 (asv's pages fetch their data, which file:// forbids)."""
    servers = []

    def start(folder):
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_page_loads_in_chromium_with_every_image_and_no_console_error(report, chromium,
                                                                          serve):
    for url in (report.as_uri(), f"{serve(report.parent.parent)}/report/index.html"):
        images, problems = chromium.open(url, settle=0.2)
        assert sorted(i["src"].rsplit("/", 1)[1] for i in images) == IMAGES
        broken = [i["src"] for i in images if not i["complete"] or i["width"] == 0]
        assert broken == [], f"images that did not load from {url}"
        assert all(i["alt"] for i in images)
        assert problems == [], f"console errors on {url}"


def test_the_tokens_are_shaded_in_the_browser_from_white_to_dark_blue(report, chromium):
    _, problems = chromium.open(report.as_uri(), settle=0.2)
    assert problems == []
    shades = chromium.evaluate(
        "[...document.querySelectorAll('.tokens span')].map(s => [s.classList[0], "
        "getComputedStyle(s).backgroundColor, s.getBoundingClientRect().width > 0])")
    colours = {klass: colour for klass, colour, _ in shades}
    assert colours["s0"] == "rgb(255, 255, 255)" and colours["s10"] == "rgb(8, 48, 107)"
    assert len(set(colours.values())) == len(colours)  # every shade its own colour
    assert all(visible for _, _, visible in shades)


def test_the_browser_check_catches_a_broken_image(report, tmp_path, chromium):
    index = shutil.copytree(report.parent, tmp_path / "copy") / "index.html"
    (index.parent / "cumulative-tiny.png").write_bytes(b"not a png")
    images, problems = chromium.open(index.as_uri(), settle=0.2)
    broken = [i["src"].rsplit("/", 1)[1] for i in images if i["width"] == 0]
    assert broken == ["cumulative-tiny.png"]


def test_the_browser_check_catches_console_errors_exceptions_and_failed_requests(tmp_path,
                                                                                   chromium):
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><link rel=icon href="data:,"><img src="absent.png" alt="x">'
                    '<script>console.error("from console")</script>'
                    '<script>throw new Error("thrown")</script>')
    _, problems = chromium.open(page.as_uri(), settle=0.2)
    assert any("absent.png" in p for p in problems)
    assert any("from console" in p for p in problems)
    assert any("Error: thrown" in p for p in problems)


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_asv_published_html_loads_every_local_file_in_chromium(tmp_path, chromium, serve):
    """`asv publish` on two fabricated commits; its own files must all load. asv 0.6.6's page
    also pulls jQuery, flot and bootstrap from CDNs, which fail offline: those are reported by
    the report page and are not asserted on here."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for i in range(2):
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
            "-m", f"c{i}")
    commits = git(repo, "rev-list", "--reverse", "main").split()
    (repo / "asv.conf.json").write_text(ASV_CONFIG)
    write_asv_results(repo / "results", commits)
    publish = subprocess.run(["python", "-m", "asv", "publish", "--config", "asv.conf.json"],
                             cwd=repo, capture_output=True, text=True, timeout=120)
    if publish.returncode != 0:
        pytest.skip(f"asv publish could not run here: {publish.stderr[-500:]}")
    html_dir = repo / "html"
    assert (html_dir / "index.json").is_file() and (html_dir / "index.html").is_file()
    _, problems = chromium.open(f"{serve(html_dir)}/index.html", settle=1.5)
    hosts = external_hosts((html_dir / "index.html").read_text())
    unexplained = [p for p in problems if not any(f"://{h}/" in p for h in hosts)]
    assert unexplained == [], "asv's page failed beyond its CDN scripts"
    report = build(Inputs(None, write_baselines(tmp_path / "b", []), (), repo / "results",
                          html_dir, repo / "asv.conf.json"), tmp_path / "report")
    text = " ".join(parse(report).text)
    assert hosts and all(h in text for h in hosts), "the report must say asv's page needs them"
    assert f"{commits[0][:8]} \u2192 {commits[1][:8]}: 1 worse" in text



def test_the_realisation_table_splits_the_gap_into_overhead_and_decision_cost(tmp_path):
    # ideal 1 / 0.5 = 2x; ceiling 1.5x: overhead 1 - 1.5 / 2 = 25%; realised 1.2x: decision cost
    # 1 - 1.2 / 1.5 = 20%; the idea itself gives up 1 - 1 / 2 = 50%, the widest gap.
    rows = [row("dense", 1.0, 0.99, 1.01, 1.0, 1.0, 0.0),
            row("skipper", 1.2, 1.1, 1.3, 1.8, 0.5, 0.01, ceiling_uniform=1.5,
                ceiling_per_token=1.25, keep_uniform=0.5, keep_per_token=0.5,
                decisions="learned")]
    results = load_results(write_results(tmp_path / "runs" / "results.json", rows))
    html_text = section_realisation(results, [], tmp_path)
    cells = re.findall(r"<td>(.*?)</td>", html_text)
    assert cells == ["<b>skipper</b>", "1.20x", "1.50x", "1.25x", "2.00x", "25%", "20%",
                     "idea: little work skipped"]
    assert (tmp_path / "realisation-tiny.png").read_bytes().startswith(PNG)


def test_the_axes_section_shows_each_axis_off_and_what_it_adds(tmp_path):
    # all on 2.4x at +30%; depth off 1.6x at +10%: depth adds 1.50x for 20.0 points
    full = row("combined", 2.4, 2.3, 2.5, 3.0, 0.3, 0.30, scale="small")
    off = row("combined", 1.6, 1.5, 1.7, 2.0, 0.5, 0.10, scale="small")
    path = write_results(tmp_path / "runs" / "results.json", [full])
    data = json.loads(path.read_text())
    data["record"].update(schema=2, scale="small", setup={"scale": "small"},
                          techniques={"combined": full}, axes={"combined": {"depth": off}})
    path.write_text(dump_json(data))
    html_text = section_axes(load_results(path), [])
    assert "combined at scale small" in html_text and "(this run)" in html_text
    cells = re.findall(r"<td>(.*?)</td>", html_text)
    assert cells == ["<b>all on</b>", "2.40x", "+30.0%", "no", "", "",
                     "without depth", "1.60x", "+10.0%", "no", "1.50x", "+20.0 points"]
    assert "No run measured" in section_axes(None, [])
