"""Per-commit baseline records toward the cumulative 10x target.

``baselines/target.json`` states the target and the quality budget. ``baselines/records/`` holds
one JSON file per recorded measurement, created once under a unique name and never rewritten
(two concurrent recordings both keep their measurement). Records are checked when read: a
missing field or a non-finite figure is an error naming the file. A commit is recorded only from
a clean working tree (or, explicitly, as ``<sha>-dirty``), and ``check`` compares only
measurements taken with the record's setup on the record's kind of machine.

A record is of one model scale (``setup.scale``; records of schema 1 predate scales and are
all ``tiny``): the history and the check are per scale, and a comparison never mixes scales.

The cumulative speedup of a record is a measured figure: the wall speedup of the ``combined``
technique when it is within the quality budget, otherwise the fastest technique within budget
that beats the dense model (a stack of one), otherwise 1.0 (``cumulative_source``, which the
asv suite's cumulative benchmark applies too). Speedups are never multiplied on paper.

Schema 2 (rows of ``bench.rows.Row``): ``scale`` at the top and in ``setup``; each technique's
entry is its row's JSON form (``Row.to_dict``). Schema 1 records stay readable.
"""

from __future__ import annotations

import math
import os
import platform
import secrets
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import measure
from bench.files import dump_json, read_json, write_new
from bench.rows import Row, RowError

BASELINES = Path(__file__).resolve().parent.parent / "baselines"
COMBINED = "combined"


@dataclass(frozen=True)
class Target:
    cumulative_speedup: float
    quality_budget: float
    stretch_quality_budget: float
    check_tolerance: float

    @classmethod
    def load(cls, root: Path = BASELINES) -> Target:
        path = root / "target.json"
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object")
        fields = ("cumulative_speedup", "quality_budget", "stretch_quality_budget",
                  "check_tolerance")
        for name in fields:
            _finite(data.get(name), f"{path}: {name}")
        return cls(*(float(data[name]) for name in fields))

    def counts(self, quality_delta: float | None) -> bool:
        """Within the quality budget: ``quality_delta <= quality_budget`` (the boundary counts;
        a missing or NaN delta does not)."""
        return quality_delta is not None and quality_delta <= self.quality_budget


def git_commit(cwd: Path = BASELINES.parent, allow_dirty: bool = False) -> str:
    """HEAD's commit. A working tree with uncommitted changes is not HEAD: it raises
    ``ValueError`` listing them, or with ``allow_dirty`` gives ``<sha>-dirty``. New baseline
    records are not counted as changes."""
    def git(*command: str) -> str:
        try:
            out = subprocess.run(["git", *command], cwd=cwd, capture_output=True, text=True,
                                 check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            raise ValueError(f"cannot read the git commit in {cwd}: "
                             f"{str(detail).strip()}") from None
        return out.stdout

    sha = git("rev-parse", "HEAD").strip()
    changed = git("status", "--porcelain", "--untracked-files=normal", "--", ".",
                  ":(exclude)baselines/records").splitlines()
    if not changed:
        return sha
    if allow_dirty:
        return f"{sha}-dirty"
    paths = [line[3:] for line in changed]
    raise ValueError(f"the working tree in {cwd} has {len(paths)} uncommitted change(s) "
                     f"({', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''}), so the "
                     f"measurement is not of commit {sha[:10]}; commit them, or pass "
                     "--allow-dirty to record it as that commit '-dirty'")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": 1, "freed_memory_kept": measure.freed_memory_kept}


def cumulative_source(names: Iterable[str], counts: Callable[[str], bool],
                      speedup: Callable[[str], float]) -> str | None:
    """The technique whose wall speedup is the cumulative one: ``combined`` when it is among
    ``names`` and within the quality budget, otherwise the fastest technique within budget if
    it beats the dense model, otherwise None (the dense model: 1.0x). ``counts`` and
    ``speedup`` are asked lazily, so a caller measuring them asks only what it needs."""
    names = list(names)
    if COMBINED in names and counts(COMBINED):
        return COMBINED
    counting = [name for name in names if counts(name)]
    if not counting:
        return None
    fastest = min(counting, key=lambda name: (-speedup(name), name))
    return fastest if speedup(fastest) > 1 else None


def cumulative(rows: Mapping[str, Row]) -> dict[str, Any]:
    """The realised cumulative speedup of measured rows (``cumulative_source``); the combined
    model's own figures are kept beside it either way."""
    source = cumulative_source(rows, lambda name: bool(rows[name].counts),
                               lambda name: rows[name].wall_speedup)
    if source is None:
        result = {"speedup": 1.0, "counts": True,
                  "source": "dense (no technique within budget is faster)"}
    else:
        result = {"speedup": rows[source].wall_speedup, "counts": True, "source": source}
    combined = rows.get(COMBINED)
    if combined is not None:
        result["combined"] = {"wall_speedup": combined.wall_speedup,
                              "quality_delta": combined.quality_delta,
                              "counts": bool(combined.counts)}
    return result


def make_record(rows: Sequence[Row], setup: dict[str, Any], target: Target,
                commit: str, axes: Mapping[str, Mapping[str, Row]] | None = None
                ) -> dict[str, Any]:
    """A schema-2 record of ``rows``, all of the setup's scale, with ``axes``: by technique
    and axis, the technique's row with that axis off (``bench.run.measure_axes``)."""
    scale = setup.get("scale")
    variants = [row for by_axis in (axes or {}).values() for row in by_axis.values()]
    other = sorted({row.scale for row in [*rows, *variants]} - {scale})
    if other:
        raise ValueError(f"a record is of one scale: rows of scale {', '.join(other)} in a "
                         f"record of scale {scale!r}")
    techniques = {row.technique: row for row in rows}
    reference = next((row.reference_perplexity for row in rows
                      if row.reference_perplexity is not None), None)
    rec = {
        "schema": 2,
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "scale": scale,
        "setup": setup,
        "dense_perplexity": reference,
        "techniques": {name: row.to_dict() for name, row in techniques.items()},
        "cumulative": cumulative(techniques),
        "target": {"cumulative_speedup": target.cumulative_speedup,
                   "quality_budget": target.quality_budget},
    }
    if axes:
        rec["axes"] = {name: {axis: row.to_dict() for axis, row in by_axis.items()}
                       for name, by_axis in axes.items()}
    return rec


def record_scale(rec: Mapping[str, Any]) -> str:
    """The scale a record was measured at; schema-1 records predate scales: all tiny."""
    return rec["scale"] if rec.get("schema") == 2 else "tiny"


def record_rows(rec: Mapping[str, Any], where: str = "the record") -> dict[str, Row]:
    """The rows of a schema-2 record by technique."""
    return {name: Row.from_dict(row, f"{where}: technique {name!r}", record_scale(rec))
            for name, row in rec["techniques"].items()}


def record_axes(rec: Mapping[str, Any], where: str = "the record"
                ) -> dict[str, dict[str, Row]]:
    """The record's rows with one axis off, by technique and axis (none in older records)."""
    axes = rec.get("axes", {})
    if not isinstance(axes, dict) or not all(isinstance(v, dict) for v in axes.values()):
        raise RowError(f"{where}: field 'axes' is not an object of objects")
    return {name: {axis: Row.from_dict(row, f"{where}: axes of {name!r}, {axis!r} off")
                   for axis, row in by_axis.items()} for name, by_axis in axes.items()}


def records_dir(root: Path = BASELINES) -> Path:
    return root / "records"


def _finite(value: Any, where: str, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; expected a finite number"
                         + (" or null" if optional else ""))
    if positive and value <= 0:
        raise ValueError(f"{where} is {value}; expected a positive number")


def validate_record(rec: Any, where: str) -> dict[str, Any]:
    """``rec`` if it is a well-formed record of schema 1 or 2; else ``ValueError`` naming the
    field."""
    if not isinstance(rec, dict) or rec.get("schema") not in (1, 2):
        raise ValueError(f"{where} is not a bk-bench baseline record (schema 1 or 2)")
    for name, kind in (("commit", str), ("date", str), ("techniques", dict),
                       ("cumulative", dict)):
        if not isinstance(rec.get(name), kind):
            raise ValueError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    if not rec["commit"]:
        raise ValueError(f"{where}: field 'commit' is empty")
    for name in ("setup", "machine"):  # needed to compare with it (``setup_differences``)
        if not isinstance(rec.get(name, {}), dict):
            raise ValueError(f"{where}: field {name!r} is not an object")
    if rec["schema"] == 2:
        _validate_rows(rec, where)
    else:
        _validate_schema_1_rows(rec, where)
    cum = rec["cumulative"]
    _finite(cum.get("speedup"), f"{where}: cumulative speedup", positive=True)
    if not isinstance(cum.get("counts"), bool) or not isinstance(cum.get("source"), str):
        raise ValueError(f"{where}: cumulative needs 'counts' (true/false) and 'source' (text)")
    return rec


def _validate_rows(rec: dict[str, Any], where: str) -> None:
    scale = rec.get("scale")
    if not isinstance(scale, str) or (rec.get("setup") or {}).get("scale") != scale:
        raise ValueError(f"{where}: field 'scale' is {scale!r}; expected the scale its setup "
                         f"names ({(rec.get('setup') or {}).get('scale')!r})")
    try:
        rows = record_rows(rec, where)
    except RowError as err:
        raise ValueError(str(err)) from None
    for name, row in rows.items():
        if row.technique != name or row.scale != scale or row.counts is None:
            raise ValueError(f"{where}: technique {name!r} holds a row of technique "
                             f"{row.technique!r} at scale {row.scale!r} with counts "
                             f"{row.counts!r}; expected {name!r} at {scale!r}, counts true or "
                             "false")
    try:
        axes = record_axes(rec, where)
    except RowError as err:
        raise ValueError(str(err)) from None
    for name, by_axis in axes.items():
        for axis, row in by_axis.items():
            if name not in rows or row.technique != name or row.scale != scale:
                raise ValueError(f"{where}: axes of {name!r}, {axis!r} off, holds a row of "
                                 f"technique {row.technique!r} at scale {row.scale!r}; "
                                 f"expected a technique of the record, {name!r} at {scale!r}")


def _validate_schema_1_rows(rec: dict[str, Any], where: str) -> None:
    for name, row in rec["techniques"].items():
        what = f"{where}: technique {name!r}"
        if not isinstance(row, dict):
            raise ValueError(f"{what} is not an object")
        _finite(row.get("wall_speedup"), f"{what} wall_speedup", positive=True)
        for key in ("wall_q1", "wall_q3", "flops_speedup", "work_ratio", "quality_delta"):
            _finite(row.get(key), f"{what} {key}", optional=True)
        if not isinstance(row.get("counts"), bool):
            raise ValueError(f"{what} counts is {row.get('counts')!r}; expected true or false")


def record(rec: dict[str, Any], root: Path = BASELINES) -> Path:
    """Write ``rec`` as a new file under a unique name: a record is never replaced, and two
    measurements recorded at once are both kept."""
    validate_record(rec, "the new record")
    stamp = rec["date"].replace(":", "").replace("-", "")[:15]
    commit = rec["commit"]
    short = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    while True:
        path = records_dir(root) / f"{stamp}-{short}-{secrets.token_hex(4)}.json"
        try:
            write_new(path, dump_json(rec))
            return path
        except FileExistsError:
            continue


def records(root: Path = BASELINES) -> list[tuple[Path, dict[str, Any]]]:
    """All records with their files, oldest first; a malformed record raises ``ValueError``
    naming the file and the field."""
    folder = records_dir(root)
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [(path, validate_record(read_json(path), str(path))) for path in paths]


def history(root: Path = BASELINES, scale: str | None = None) -> list[dict[str, Any]]:
    """All records (of ``scale`` when given), oldest first (see ``records``)."""
    return [rec for _, rec in records(root) if scale is None or record_scale(rec) == scale]


COMPARED_MACHINE = ("cpu", "cores", "torch", "torch_threads", "freed_memory_kept")
# Settings added to Setup after records were written, with the value those records were measured
# at: a setup (recorded or not) without the field compares as if it named that value.
ADDED_SETTINGS: dict[str, Any] = {"quality_split": "test", "knobs": {}, "start": "dense"}


def setup_differences(rec: Mapping[str, Any], setup: Mapping[str, Any],
                      here: Mapping[str, Any] | None = None) -> list[str]:
    """How a measurement's setup (``Setup.describe()``) and machine differ from a record's:
    ``"field: record X, now Y"`` for each (the output folder does not matter)."""
    here = machine() if here is None else here
    recorded, recorded_machine = {**ADDED_SETTINGS, **rec.get("setup", {})}, rec.get("machine", {})
    setup = {**ADDED_SETTINGS, **setup}
    differ = [f"{k}: record {recorded.get(k)!r}, now {setup.get(k)!r}"
              for k in sorted(set(recorded) | set(setup))
              if k != "output" and recorded.get(k) != setup.get(k)]
    differ += [f"machine {k}: record {recorded_machine.get(k)!r}, now {here.get(k)!r}"
               for k in COMPARED_MACHINE if recorded_machine.get(k) != here.get(k)]
    return differ


def latest_comparable(history: Sequence[tuple[Path, dict[str, Any]]],
                      setup: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The latest record of ``setup``'s scale measured with ``setup`` on this kind of machine;
    ``ValueError`` saying why there is none (no record of the scale, or how the latest one of
    the scale differs)."""
    scale = setup.get("scale")
    same_scale = [(path, rec) for path, rec in history if record_scale(rec) == scale]
    if not same_scale:
        raise ValueError(f"no baseline record at scale {scale!r} to check against; run "
                         f"`bk-bench baseline record --scale {scale}` first")
    for path, rec in reversed(same_scale):
        if not setup_differences(rec, setup):
            return path, rec
    path, rec = same_scale[-1]
    raise ValueError(f"no record at scale {scale!r} was measured with this setup: the latest, "
                     f"{path}, was measured with another setup "
                     f"({'; '.join(setup_differences(rec, setup))}); check with its setup, or "
                     "record a new baseline")


@dataclass(frozen=True)
class CheckRow:
    technique: str
    recorded: float
    measured: float
    quality_delta: float | None
    problem: str | None


def check(rows: Sequence[Row], latest: dict[str, Any], target: Target, *,
          setup: Mapping[str, Any], tolerance: float | None = None) -> list[CheckRow]:
    """Compare fresh measurements with the latest record.

    Measurements of another setup (``setup_differences``, the scale included) are not
    comparable: ``ValueError`` naming the fields; nor are rows of another scale than the
    record's. A row fails when the speedup falls more than ``tolerance`` (relative) below the
    recorded one, or when a technique that counted toward the target leaves the quality budget.
    """
    differ = setup_differences(latest, setup)
    if differ:
        raise ValueError(f"the latest record (commit {latest['commit'][:10]}) was measured with "
                         f"another setup ({'; '.join(differ)}); measure with the record's "
                         "setup, or record a new baseline")
    scale = record_scale(latest)
    mixed = sorted({f"{row.technique} ({row.scale})" for row in rows if row.scale != scale})
    if mixed:
        raise ValueError(f"rows of another scale than the record's ({scale}): "
                         f"{', '.join(mixed)}; a comparison never mixes scales")
    tolerance = target.check_tolerance if tolerance is None else tolerance
    checked = []
    for row in rows:
        old = latest["techniques"].get(row.technique)
        if old is None:
            checked.append(CheckRow(row.technique, float("nan"), row.wall_speedup,
                                    row.quality_delta, None))
            continue
        problem = None
        if row.wall_speedup < old["wall_speedup"] * (1 - tolerance):
            problem = f"speedup fell more than {tolerance:.0%}"
        elif old["counts"] and not target.counts(row.quality_delta):
            problem = f"quality left the +{target.quality_budget:.0%} budget"
        checked.append(CheckRow(row.technique, old["wall_speedup"], row.wall_speedup,
                                row.quality_delta, problem))
    return checked
