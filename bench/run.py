"""The main job: train or load the dense baseline and every technique, measure, report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bench.baselines import make_record
from bench.console import setup_title
from bench.figures import speed_points, speed_quality
from bench.files import dump_json, publish
from bench.pipeline import Bench, Setup, axis_label, axis_variants
from bench.progress import Progress
from bench.registry import REFERENCE, get, techniques
from bench.rows import Row
from bench.tokens import passage_stats
from bk.ngram import ngram_cross_entropy


def frame(rows: Iterable[Row]) -> pd.DataFrame:
    """The rows as a table, one column per figure (``Row.flat``) and the spread as text."""
    flat = []
    for row in rows:
        line = row.flat()
        line["spread"] = (None if row.wall_q1 is None or row.wall_q3 is None
                          else f"{row.wall_q1:.2f}-{row.wall_q3:.2f}")
        flat.append(line)
    return pd.DataFrame(flat)


def baseline_quality(bench: Bench) -> dict[str, float]:
    corpus = bench.corpus
    dense = bench.quality(bench.dense(), REFERENCE)
    ln2 = math.log(2)
    return {
        "dense_test_nats": dense.loss, "dense_test_bits": dense.loss / ln2,
        "dense_test_perplexity": dense.perplexity,
        "unigram_test_bits": ngram_cross_entropy(corpus, 1) / ln2,
        "bigram_test_bits": ngram_cross_entropy(corpus, 2) / ln2,
    }


def measure_all(bench: Bench, names: Iterable[str] | None = None, *,
                ceilings: bool = False) -> list[Row]:
    """The dense model against itself (an A/A row that shows the noise), then each technique;
    with ``ceilings``, each row with its ceilings (``Bench.measure``)."""
    return [bench.measure(name, ceilings=ceilings) for name in chosen(names, bench.setup.knobs)]


def measure_axes(bench: Bench, names: Iterable[str]) -> dict[str, dict[str, Row]]:
    """Each technique that declares axes (``Technique.axes``) with each axis its knobs (the
    setup's, else the defaults) switch on switched off in turn (``axis_variants``), by technique
    and axis: against the technique's row, what that axis contributes in speed and in quality.
    No ceilings: these rows only explain the technique's row."""
    measured = {}
    for name in names:
        technique = get(name)
        variants = axis_variants(technique, bench.setup.knobs.get(name))
        if variants:
            measured[name] = {axis: bench.measure(technique, off, label=axis_label(name, axis))
                              for axis, off in variants.items()}
    return measured


def chosen(names: Iterable[str] | None = None,
           knobs: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """``names``, or every registered technique (dense first); unknown names are refused, and
    so are ``knobs`` (``Setup.knobs``) set for a technique not among them."""
    registered = techniques()
    picked = list(names) if names else list(registered)
    unknown = [name for name in [*picked, *(knobs or {})] if name not in registered]
    if unknown:
        raise ValueError(f"unknown technique {unknown[0]!r}; registered: "
                         f"{', '.join(registered)}")
    unmeasured = sorted(set(knobs or {}) - set(picked))
    if unmeasured:
        raise ValueError(f"knobs set for {unmeasured[0]!r}, which is not measured here "
                         f"(measured: {', '.join(picked)})")
    return picked


def run(setup: Setup, names: Iterable[str] | None = None,
        commit: str = "uncommitted") -> dict[str, Any]:
    """Measure everything (ceilings included, and each technique with each of its axes off);
    write results.json, results.csv, speedups.png
    (speed against quality) and tokens.json (per-token statistics for the report) as one set
    (``bench.files.publish``: a reader never sees files of two runs). Progress is reported by
    phase (``bench.progress``) unless ``setup.progress`` is off."""
    if setup.quality_split != "test":
        raise ValueError(f"a run reports quality on the test split (results, report, records); "
                         f"got quality_split {setup.quality_split!r}, which is for choosing "
                         f"knobs (bk-bench tune)")
    names = chosen(names, setup.knobs)
    bench = Bench(setup)
    target = bench.target
    progress = Progress(bench.job(names, axes=True), title=f"bk-bench run --scale {setup.scale}",
                        live=None if setup.progress else False)
    bench.progress = progress
    try:
        bench.dense()
        quality = baseline_quality(bench)
        rows = measure_all(bench, names, ceilings=True)
        axes = measure_axes(bench, names)
    finally:
        if setup.progress:
            progress.close()
    record = make_record([r for r in rows if r.technique != REFERENCE], setup.describe(),
                         target, commit, axes)
    record["quality"] = quality
    dicts = [r.to_dict() for r in rows]
    figure = speed_quality(speed_points(dicts, target.counts), target.quality_budget,
                           target.cumulative_speedup, setup_title(record["setup"]))
    publish(setup.output, "results", {
        "results.json": dump_json({"record": record, "rows": dicts}),
        "results.csv": frame(rows).to_csv(index=False),
        "speedups.png": figure,
        "tokens.json": dump_json(passage_stats(bench, names))})
    return record


def sweep(setup: Setup, technique: str, knob: str, values: list[Any],
          fixed: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, Path]:
    """Fine-tune and measure ``technique`` at each value of one knob.

    Returns the table and the path stem of its CSV/JSON files, which name the technique, the
    knob, the fixed knobs, the scale, the sequence length, the timed batches, the training
    steps and a quality split other than test, so sweeps of different settings never overwrite
    each other.
    """
    bench = Bench(setup)
    rows = [bench.measure(technique, {**(fixed or {}), knob: value}) for value in values]
    df = frame(rows)
    # "none" as text: in a column of numbers pandas would turn None into NaN (printed "nan").
    df.insert(1, knob, pd.Series(["none" if v is None else v for v in values], dtype=object))
    settings = "-".join(f"{k}={v}" for k, v in sorted((fixed or {}).items()))
    split = None if setup.quality_split == "test" else setup.quality_split
    name = "-".join(filter(None, [technique, knob, settings, setup.scale, f"n{setup.seq_len}",
                                  f"w{setup.workload_batches or 'all'}", f"s{setup.steps}",
                                  split]))
    out = setup.output / "sweeps" / name
    publish(out.parent, name, {f"{name}.csv": df.to_csv(index=False),
                               f"{name}.json": dump_json([r.to_dict() for r in rows])})
    return df, out
