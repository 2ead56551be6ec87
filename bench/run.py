"""The main job: train or load the dense baseline and every technique, measure, report."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bench.baselines import Target, make_record
from bench.files import dump_json, figure_writer, publish
from bench.measure import Comparison
from bench.pipeline import Bench, Setup
from bench.registry import REFERENCE, techniques
from bk.ngram import ngram_cross_entropy
from bk.train import evaluate

COLUMNS = {
    "technique": "technique",
    "knobs": "knobs",
    "wall_speedup": "wall speedup",
    "spread": "IQR",
    "flops_speedup": "FLOPs speedup",
    "work_ratio": "work ratio",
    "quality_delta": "ppl delta",
    "counts": "counts?",
}


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


def render(df: pd.DataFrame, extra: Iterable[str] = ()) -> str:
    """A readable fixed-width table of the columns that matter."""
    columns = [c for c in [*COLUMNS, *extra] if c in df.columns]
    shown = df[columns].rename(columns=COLUMNS)
    formats = {
        "wall speedup": "{:.2f}x".format, "FLOPs speedup": "{:.2f}x".format,
        "work ratio": "{:.2f}".format,
        "ppl delta": lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v))
        else f"{v:+.1%}",
    }
    for name in shown.columns:
        if name.startswith("mean_"):
            formats[name] = "{:.2f}".format
    return shown.to_string(index=False, formatters=formats)


def plot(df: pd.DataFrame, target: Target) -> bytes:
    """Wall speedup next to FLOPs speedup and 1/work ratio per technique (seaborn), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.DataFrame({
        "technique": list(df["technique"]) * 3,
        "measure": (["wall speedup"] * len(df) + ["FLOPs speedup"] * len(df)
                    + ["1 / work ratio"] * len(df)),
        "x": [*df["wall_speedup"], *df["flops_speedup"], *(1 / df["work_ratio"])],
    })
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(df) + 2))
    sns.barplot(data=long, y="technique", x="x", hue="measure", ax=ax)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("x over the dense baseline (wall speedup is the measured one)")
    ax.set_title(f"bk-bench: speedups (target {target.cumulative_speedup:g}x cumulative)")
    fig.tight_layout()
    png = io.BytesIO()
    figure_writer(fig)(png)
    plt.close(fig)
    return png.getvalue()


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
    """Measure everything, print the table, write results.json, results.csv and speedups.png
    as one set (``bench.files.publish``: a reader never sees files of two runs)."""
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
    out = setup.output
    publish(out, "results", {
        "results.json": dump_json({"record": record, "rows": _clean(df.to_dict("records"))}),
        "results.csv": df.to_csv(index=False),
        "speedups.png": plot(df, target)})
    print(render(df))
    print(f"\ndense test: {quality['dense_test_bits']:.3f} bits/char (perplexity "
          f"{quality['dense_test_perplexity']:.2f}); unigram {quality['unigram_test_bits']:.3f}, "
          f"bigram {quality['bigram_test_bits']:.3f} bits/char")
    cum = record["cumulative"]
    print(f"cumulative speedup: {cum['speedup']:.2f}x ({cum['source']}) against the "
          f"{target.cumulative_speedup:g}x target, quality budget +{target.quality_budget:.0%}")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'speedups.png'}")
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

