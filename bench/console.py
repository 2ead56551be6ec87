"""What bk-bench prints: result tables that fit 100 columns and cannot be misread.

Every row shows its speedup with the spread it was measured with and a NOISY flag when that
spread is too wide to trust the figure, and says yes or no to the quality budget. Rows are the
mappings written to results.json and the sweep files (``technique``, ``wall_speedup``,
``wall_q1``/``wall_q3``, ``noise_warning``, ``ceiling_uniform``, ``work_ratio``,
``quality_delta``, ``mean_<stat>``); a missing or NaN figure prints as
``n/a``. This module imports no model code.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bench.rows import knobs_text

WIDTH = 100
NAME_WIDTH = 16  # the widest figures in every other column still fit WIDTH

Row = Mapping[str, Any]


def number(value: Any) -> float | None:
    """A finite figure, or None for a missing one (None, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def times(value: Any) -> str:
    """A speedup in at most 7 characters: ``0.90x``, ``123x``, ``2e+05x``."""
    v = number(value)
    if v is None:
        return "n/a"
    if abs(v) < 100:
        return f"{v:.2f}x"
    return f"{v:.0f}x" if abs(v) < 1e5 else f"{v:.0e}x"


def ratio(value: Any) -> str:
    """A ratio in at most 7 characters: ``0.92``, ``-999.99``, ``1e+04``."""
    v = number(value)
    if v is None:
        return "n/a"
    return f"{v:.2f}" if abs(v) < 1e3 else f"{v:.0e}"


def percent(value: Any) -> str:
    """A relative change in at most 8 characters: ``+1.6%``, ``-0.1%``, ``>+1000%``."""
    v = number(value)
    if v is None:
        return "n/a"
    if v >= 10:
        return ">+1000%"
    if v <= -10:
        return "<-1000%"
    return f"{v:+.1%}"


def clip(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def spread(row: Row) -> float | None:
    """The interquartile range of the per-round ratios relative to the median."""
    wall, q1, q3 = (number(row.get(k)) for k in ("wall_speedup", "wall_q1", "wall_q3"))
    if wall is None or q1 is None or q3 is None or wall <= 0:
        return None
    return (q3 - q1) / wall


def noisy(row: Row) -> bool:
    return bool(row.get("noise_warning"))


def grid(header: Sequence[str], cells: Iterable[Sequence[str]], left: int = 1) -> list[str]:
    """Fixed-width lines: the first ``left`` columns aligned left, the others right."""
    rows = [list(header), *(list(c) for c in cells)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def wall_text(row: Row) -> str:
    """The wall speedup with its interquartile range, ``1.20x (1.10-1.30)``."""
    q1, q3 = number(row.get("wall_q1")), number(row.get("wall_q3"))
    iqr = "" if q1 is None or q3 is None else f" ({ratio(q1)}-{ratio(q3)})"
    return times(row.get("wall_speedup")) + iqr


def table(rows: Sequence[Row], counts: Callable[[float | None], bool], budget: float,
          label: str = "technique") -> str:
    """The result table: one line per row, at most ``WIDTH`` columns.

    ``counts(quality_delta)`` is the budget rule (``Target.counts``); ``label`` names the
    column that identifies a row (a sweep's knob).
    """
    header = [clip(label, NAME_WIDTH), "wall speedup (IQR)", "spread", "ceiling", "ideal",
              "ppl delta", "in budget?"]
    cells = []
    for row in rows:
        s = spread(row)
        noise = ("n/a" if s is None else f"{s:.0%}" if abs(s) < 10 else
                 ">999%" if s > 0 else "<-999%") + (" NOISY" if noisy(row) else "")
        delta = number(row.get("quality_delta"))
        verdict = "n/a" if delta is None else ("yes" if counts(delta) else "no")
        work = number(row.get("work_ratio"))
        ideal = None if work is None or work <= 0 else 1 / work
        cells.append([clip(row.get(label, "?"), NAME_WIDTH), wall_text(row),
                      noise, times(row.get("ceiling_uniform")), times(ideal), percent(delta),
                      verdict])
    return "\n".join(grid(header, cells))


def stats_table(rows: Sequence[Row], label: str = "technique") -> str:
    """Per-token statistics (``mean_<stat>`` columns), split into tables of at most ``WIDTH``
    columns; empty when no row has any."""
    stats = sorted({k for row in rows for k in row if k.startswith("mean_")})
    if not stats:
        return ""
    title = clip(label, NAME_WIDTH)
    names = [clip(row.get(label, "?"), NAME_WIDTH) for row in rows]
    first = max(len(title), *(len(n) for n in names))
    chunks: list[list[str]] = [[]]
    used = first
    for stat in stats:
        width = 2 + min(len(stat) - len("mean_"), 24)
        if chunks[-1] and used + width > WIDTH:
            chunks.append([])
            used = first
        chunks[-1].append(stat)
        used += width
    parts = []
    for chunk in chunks:
        header = [title, *(clip(s.removeprefix("mean_"), 24) for s in chunk)]
        cells = [[n, *(ratio(row.get(s)) for s in chunk)] for n, row in zip(names, rows,
                                                                          strict=True)]
        parts.append("\n".join(grid(header, cells)))
    return "per-token statistics (mean over the workload's tokens):\n" + "\n\n".join(parts)


def axes_table(record: Mapping[str, Any]) -> str:
    """Per technique with axes (``record["axes"]``): the technique with each axis off, and
    what that axis adds with every other axis on: its speed factor (all on / this one off) and
    its perplexity cost in points. Empty when the record has none."""
    parts = []
    for name, by_axis in (record.get("axes") or {}).items():
        full = record["techniques"][name]
        header = [clip(f"{name} without", NAME_WIDTH), "wall speedup (IQR)", "ppl delta",
                  "the axis: speed", "the axis: ppl"]
        cells = []
        for axis, row in by_axis.items():
            speed, off = number(full.get("wall_speedup")), number(row.get("wall_speedup"))
            delta, off_delta = number(full.get("quality_delta")), number(row.get("quality_delta"))
            cost = (None if delta is None or off_delta is None else
                    f"{100 * (delta - off_delta):+.1f} points")
            cells.append([clip(axis, NAME_WIDTH), wall_text(row), percent(off_delta),
                          times(None if speed is None or not off else speed / off),
                          cost or "n/a"])
        parts.append("\n".join(grid(header, cells)))
    if not parts:
        return ""
    return "\n\n".join(parts) + "\n" + wrap(
        "the axis: what it adds with every other axis on, its speed as the speedup with all "
        "axes over the speedup without it, its quality cost as the difference of perplexity "
        "deltas.")


def legend(rows: Sequence[Row], budget: float, noise_limit: float) -> str:
    flagged = sum(noisy(r) for r in rows)
    noise = (f"{flagged} of {len(rows)} rows are NOISY: their speedups are not firm; re-run with "
             "more --rounds on a quieter machine." if flagged else
             "No row is noisy.")
    return wrap(
        f"spread: interquartile range of the per-round speed ratios over the median; NOISY above "
        f"{noise_limit:.0%}. {noise} ceiling: the same skip pattern with its decisions given "
        f"for free (n/a: not measured); ideal: 1 / the executed-work ratio (FLOPs of the work "
        f"that ran; torch's FLOP count is in results.csv and the report). Ceiling and ideal say "
        f"what the technique could deliver, not what it did. ppl delta: test perplexity against "
        f"the dense model trained as long. in budget?: at most +{budget:.0%}, so the row may "
        f"count toward the target.")


def headline(cumulative: Mapping[str, Any], target: float, budget: float,
             noisy: bool = False) -> str:
    """The cumulative figure in words that never read 1.00x (or less) as progress; ``noisy``:
    the measurement it comes from is flagged as noisy."""
    speed = number(cumulative.get("speedup"))
    source = str(cumulative.get("source", ""))
    if speed is None:
        return f"cumulative speedup: not measured; target {target:g}x"
    if source.startswith("dense"):
        return (f"cumulative speedup {speed:.2f}x: no technique within the +{budget:.0%} quality "
                f"budget is faster than the dense model; target {target:g}x")
    if speed <= 1:
        return (f"cumulative speedup {speed:.2f}x ({source}, within the +{budget:.0%} quality "
                f"budget): no faster than the dense model; target {target:g}x")
    return (f"cumulative speedup {speed:.2f}x ({source}, within the +{budget:.0%} quality "
            f"budget{', NOISY: not a firm figure' if noisy else ''}); target {target:g}x, "
            f"{target / speed:.2g}x still to go")


def setup_title(setup: Mapping[str, Any]) -> str:
    """The settings a figure was measured at, in a few words (the scale first)."""
    parts = [f"scale {setup.get('scale', 'tiny')}", str(setup.get("corpus", "")),
             f"{setup['steps']} dense steps" if "steps" in setup else "",
             f"{setup.get('batch_size')} x {setup.get('seq_len')} tokens per batch"
             if "seq_len" in setup else "",
             f"{setup['workload_batches']} test batches timed"
             if setup.get("workload_batches") else "",
             "techniques trained from scratch" if setup.get("start") == "scratch" else "",
             technique_knobs_text(setup.get("knobs") or {})]
    return ", ".join(p for p in parts if p)


def run_summary(results: Mapping[str, Any], target: Any, noise_limit: float,
                report: str) -> str:
    """What ``bk-bench run`` prints: the table, how to read it, the dense model's quality, the
    cumulative headline and where the full report is. ``target`` is a ``Target``."""
    rows, record = results["rows"], results["record"]
    budget = target.quality_budget
    parts = [table(rows, target.counts, budget), "", legend(rows, budget, noise_limit), ""]
    axes = axes_table(record)
    if axes:
        parts += [axes, ""]
    quality = record.get("quality") or {}
    if quality:
        parts.append(wrap(f"dense model: {quality['dense_test_bits']:.3f} bits/char on the test "
                          f"split (perplexity {quality['dense_test_perplexity']:.2f}); unigram "
                          f"{quality['unigram_test_bits']:.3f}, bigram "
                          f"{quality['bigram_test_bits']:.3f} bits/char"))
    cumulative = record.get("cumulative") or {}
    source = [r for r in rows if r.get("technique") == cumulative.get("source")]
    parts += [wrap(headline(cumulative, target.cumulative_speedup, budget,
                            noisy=any(noisy(r) for r in source))),
              knobs_note(record.get("setup", {}).get("knobs") or {}),
              "", report]
    return "\n".join(parts)


def knobs_note(knobs: Mapping[str, Mapping[str, Any]]) -> str:
    """Which knobs a run set (``Setup.knobs``); every other is at its default."""
    defaults = "(`bk-bench techniques` lists them)"
    if not knobs:
        return f"every technique ran at its default knobs {defaults}"
    return wrap(f"knobs set: {technique_knobs_text(knobs)}; every other knob at its default "
                f"{defaults}")


def technique_knobs_text(knobs: Mapping[str, Mapping[str, Any]]) -> str:
    """``technique knob=value, ...; ...`` for knobs set by technique (``Setup.knobs``)."""
    return "; ".join(f"{name} {knobs_text(values)}" for name, values in knobs.items())


def wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def knobs_lines(knobs: Mapping[str, Mapping[str, Any]]) -> str:
    """``name: knob=value, ...`` per technique, wrapped."""
    return "\n".join(
        wrap(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), "")
        for name, values in knobs.items() if values)


def techniques_text(techniques: Iterable[Any]) -> str:
    """Each technique's summary and knobs (name, type, default, valid values, help), for
    ``bk-bench techniques``; ``techniques`` are ``bench.registry.Technique``."""
    parts = []
    for t in techniques:
        lines = [wrap(f"{t.name}: {t.summary}")]
        if not t.knobs:
            lines.append("  (no knobs)")
        for k in t.knobs:
            lines.append(wrap(f"{k.name} ({k.kind.__name__}, default {k.default}): "
                              f"{k.describe()}", "  "))
            lines.append(wrap(k.help, "      "))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
