"""The main job: train or load the dense baseline and every technique, measure, report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bench.baselines import Target, make_record
from bench.console import setup_title
from bench.figures import speed_points, speed_quality
from bench.files import dump_json, publish
from bench.measure import Comparison
from bench.pipeline import Bench, Setup
from bench.registry import REFERENCE, techniques
from bench.tokens import passage_stats
from bk.ngram import ngram_cross_entropy
from bk.train import evaluate


def frame(comparisons: Iterable[Comparison], target: Target,
          knobs: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    rows = []
    for c in comparisons:
        row = c.as_dict()
        row["spread"] = f"{c.speed.q1:.2f}-{c.speed.q3:.2f}"
        row["counts"] = target.counts(c.quality_delta)
        row["knobs"] = ", ".join(f"{k}={v}" for k, v in (knobs or {}).get(c.name, {}).items()
                                 if v is not None)
        rows.append(row)
    return pd.DataFrame(rows)


def baseline_quality(bench: Bench) -> dict[str, float]:
    corpus = bench.corpus
    dense = evaluate(bench.dense(), corpus, "test", max_batches=bench.setup.quality_batches)
    ln2 = math.log(2)
    return {
        "dense_test_nats": dense.loss, "dense_test_bits": dense.loss / ln2,
        "dense_test_perplexity": dense.perplexity,
        "unigram_test_bits": ngram_cross_entropy(corpus, 1) / ln2,
        "bigram_test_bits": ngram_cross_entropy(corpus, 2) / ln2,
    }


def measure_all(bench: Bench, names: Iterable[str] | None = None) -> list[Comparison]:
    """The dense model against itself (an A/A row that shows the noise), then each technique."""
    registered = techniques()
    chosen = list(names) if names else list(registered)
    return [bench.measure(name) for name in chosen]


def run(setup: Setup, names: Iterable[str] | None = None,
        commit: str = "uncommitted") -> dict[str, Any]:
    """Measure everything; write results.json, results.csv, speedups.png (speed against quality)
    and tokens.json (per-token statistics for the report) as one set (``bench.files.publish``:
    a reader never sees files of two runs)."""
    bench = Bench(setup)
    target = Target.load()
    bench.dense()
    quality = baseline_quality(bench)
    comparisons = measure_all(bench, names)
    knobs = {name: t.defaults() for name, t in techniques().items()}
    df = frame(comparisons, target, knobs)
    record = make_record([c for c in comparisons if c.name != REFERENCE], setup.describe(),
                         target, commit)
    record["quality"] = quality
    rows = _clean(df.to_dict("records"))
    figure = speed_quality(speed_points(rows, target.counts), target.quality_budget,
                           target.cumulative_speedup, setup_title(record["setup"]))
    publish(setup.output, "results", {
        "results.json": dump_json({"record": record, "rows": rows}),
        "results.csv": df.to_csv(index=False),
        "speedups.png": figure,
        "tokens.json": dump_json(passage_stats(bench, [c.name for c in comparisons]))})
    return record


def _clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON has no NaN: missing figures become null."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in rows]


def sweep(setup: Setup, technique: str, knob: str, values: list[Any],
          fixed: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, Path]:
    """Fine-tune and measure ``technique`` at each value of one knob.

    Returns the table and the path stem of its CSV/JSON files, which name the technique, the
    knob, the fixed knobs, the sequence length, quick or full, and the training steps, so
    sweeps of different settings never overwrite each other.
    """
    bench = Bench(setup)
    target = Target.load()
    comparisons, knobs = [], {}
    for value in values:
        settings = {**(fixed or {}), knob: value}
        c = bench.measure(technique, settings)
        c.name = f"{technique}[{knob}={value}]"
        knobs[c.name] = settings
        comparisons.append(c)
    df = frame(comparisons, target, knobs)
    df.insert(1, knob, values)
    settings = "-".join(f"{k}={v}" for k, v in sorted((fixed or {}).items()))
    scale = "quick" if setup.workload_batches else "full"
    name = "-".join(filter(None, [technique, knob, settings, f"n{setup.seq_len}", scale,
                                  f"s{setup.steps}"]))
    out = setup.output / "sweeps" / name
    publish(out.parent, name, {f"{name}.csv": df.to_csv(index=False),
                               f"{name}.json": dump_json(_clean(df.to_dict("records")))})
    return df, out

