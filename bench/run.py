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
from bench.pipeline import Bench, Setup
from bench.progress import Progress
from bench.registry import REFERENCE, techniques
from bench.rows import Row
from bk.ngram import ngram_cross_entropy

COLUMNS = {
    "technique": "technique",
    "knobs": "knobs",
    "wall_speedup": "wall speedup",
    "spread": "IQR",
    "flops_speedup": "FLOPs speedup",
    "work_ratio": "work ratio",
    "quality_delta": "ppl delta",
    "counts": "counts?",
    "ceiling_uniform": "ceiling",
}


def frame(rows: Iterable[Row]) -> pd.DataFrame:
    """The rows as a table, one column per figure (``Row.flat``) and the spread as text."""
    flat = []
    for row in rows:
        line = row.flat()
        line["spread"] = (None if row.wall_q1 is None or row.wall_q3 is None
                          else f"{row.wall_q1:.2f}-{row.wall_q3:.2f}")
        flat.append(line)
    return pd.DataFrame(flat)


def render(df: pd.DataFrame, extra: Iterable[str] = ()) -> str:
    """A readable fixed-width table of the columns that matter."""
    columns = [c for c in [*COLUMNS, *extra] if c in df.columns]
    shown = df[columns].rename(columns=COLUMNS)
    formats = {
        "wall speedup": "{:.2f}x".format, "FLOPs speedup": "{:.2f}x".format,
        "work ratio": "{:.2f}".format, "ceiling": "{:.2f}x".format,
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
    return [bench.measure(name, ceilings=ceilings) for name in chosen(names)]


def chosen(names: Iterable[str] | None = None) -> list[str]:
    """``names``, or every registered technique (dense first); unknown names are refused."""
    registered = techniques()
    picked = list(names) if names else list(registered)
    unknown = [name for name in picked if name not in registered]
    if unknown:
        raise ValueError(f"unknown technique {unknown[0]!r}; registered: "
                         f"{', '.join(registered)}")
    return picked


def run(setup: Setup, names: Iterable[str] | None = None,
        commit: str = "uncommitted") -> dict[str, Any]:
    """Measure everything (ceilings included), print the table, write results.json,
    results.csv and speedups.png as one set (``bench.files.publish``: a reader never sees
    files of two runs). Progress is reported by phase (``bench.progress``) unless
    ``setup.progress`` is off."""
    bench = Bench(setup)
    target = bench.target
    names = chosen(names)
    progress = Progress(bench.job(names), title=f"bk-bench run --scale {setup.scale}",
                        live=None if setup.progress else False)
    bench.progress = progress
    try:
        bench.dense()
        quality = baseline_quality(bench)
        rows = measure_all(bench, names, ceilings=True)
    finally:
        if setup.progress:
            progress.close()
    df = frame(rows)
    record = make_record([r for r in rows if r.technique != REFERENCE], setup.describe(),
                         target, commit)
    record["quality"] = quality
    out = setup.output
    publish(out, "results", {
        "results.json": dump_json({"record": record, "rows": [r.to_dict() for r in rows]}),
        "results.csv": df.to_csv(index=False),
        "speedups.png": plot(df, target)})
    print(render(df))
    print(f"\nscale {setup.scale}; dense test: {quality['dense_test_bits']:.3f} bits/char "
          f"(perplexity {quality['dense_test_perplexity']:.2f}); unigram "
          f"{quality['unigram_test_bits']:.3f}, bigram {quality['bigram_test_bits']:.3f} "
          "bits/char")
    cum = record["cumulative"]
    print(f"cumulative speedup: {cum['speedup']:.2f}x ({cum['source']}) against the "
          f"{target.cumulative_speedup:g}x target, quality budget +{target.quality_budget:.0%}")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'speedups.png'}")
    return record


def sweep(setup: Setup, technique: str, knob: str, values: list[Any],
          fixed: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, Path]:
    """Fine-tune and measure ``technique`` at each value of one knob.

    Returns the table and the path stem of its CSV/JSON files, which name the technique, the
    knob, the fixed knobs, the scale, the sequence length, the timed batches and the training
    steps, so sweeps of different settings never overwrite each other.
    """
    bench = Bench(setup)
    rows = [bench.measure(technique, {**(fixed or {}), knob: value}) for value in values]
    df = frame(rows)
    df.insert(1, knob, values)
    settings = "-".join(f"{k}={v}" for k, v in sorted((fixed or {}).items()))
    name = "-".join(filter(None, [technique, knob, settings, setup.scale, f"n{setup.seq_len}",
                                  f"w{setup.workload_batches or 'all'}", f"s{setup.steps}"]))
    out = setup.output / "sweeps" / name
    publish(out.parent, name, {f"{name}.csv": df.to_csv(index=False),
                               f"{name}.json": dump_json([r.to_dict() for r in rows])})
    return df, out
