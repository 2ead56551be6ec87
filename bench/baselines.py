"""Per-commit baseline records toward the cumulative 10x target.

``baselines/target.json`` states the target and the quality budget. ``baselines/records/`` holds
one JSON file per recorded measurement, created once under a unique name and never rewritten
(two concurrent recordings both keep their measurement). Records are checked when read: a
missing field or a non-finite figure is an error naming the file. A commit is recorded only from
a clean working tree (or, explicitly, as ``<sha>-dirty``), and ``check`` compares only
measurements taken with the record's setup on the record's kind of machine.

The cumulative speedup of a record is a measured figure: the wall speedup of the ``combined``
technique when one is registered, otherwise the best single technique within the quality budget
(a stack of one), otherwise 1.0. Speedups are never multiplied on paper.
"""

from __future__ import annotations

import math
import os
import platform
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.files import dump_json, read_json, write_new
from bench.measure import Comparison

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
            "torch_threads": 1}


def cumulative(techniques: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The realized cumulative speedup: the combined model when it is within the quality budget,
    otherwise the fastest technique within budget that beats the dense model, otherwise 1.0x.
    The combined model's own figures are kept beside it either way."""
    combined = techniques.get(COMBINED)
    counting = {name: row for name, row in techniques.items()
                if row["counts"] and row["wall_speedup"] > 1}
    if combined is not None and combined["counts"]:
        result = {"speedup": combined["wall_speedup"], "counts": True, "source": COMBINED}
    elif counting:
        name = max(counting, key=lambda n: counting[n]["wall_speedup"])
        result = {"speedup": counting[name]["wall_speedup"], "counts": True, "source": name}
    else:
        result = {"speedup": 1.0, "counts": True,
                  "source": "dense (no technique within budget is faster)"}
    if combined is not None:
        result["combined"] = {key: combined[key] for key in
                              ("wall_speedup", "quality_delta", "counts")}
    return result


def make_record(comparisons: list[Comparison], setup: dict[str, Any], target: Target,
                commit: str) -> dict[str, Any]:
    techniques: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        techniques[c.name] = {
            "wall_speedup": c.wall_speedup, "wall_q1": c.speed.q1, "wall_q3": c.speed.q3,
            "rounds": c.speed.rounds, "flops_speedup": c.flops_speedup,
            "work_ratio": c.work_ratio, "quality_delta": c.quality_delta,
            "perplexity": c.quality_candidate.perplexity if c.quality_candidate else None,
            "counts": target.counts(c.quality_delta),
        }
    reference = next((c.quality_reference for c in comparisons if c.quality_reference), None)
    return {
        "schema": 1,
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "setup": setup,
        "dense_perplexity": reference.perplexity if reference else None,
        "techniques": techniques,
        "cumulative": cumulative(techniques),
        "target": {"cumulative_speedup": target.cumulative_speedup,
                   "quality_budget": target.quality_budget},
    }


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
    """``rec`` if it is a well-formed schema-1 record; else ``ValueError`` naming the field."""
    if not isinstance(rec, dict) or rec.get("schema") != 1:
        raise ValueError(f"{where} is not a bk-bench baseline record (schema 1)")
    for name, kind in (("commit", str), ("date", str), ("techniques", dict),
                       ("cumulative", dict)):
        if not isinstance(rec.get(name), kind):
            raise ValueError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    if not rec["commit"]:
        raise ValueError(f"{where}: field 'commit' is empty")
    for name in ("setup", "machine"):  # needed to compare with it (``setup_differences``)
        if not isinstance(rec.get(name, {}), dict):
            raise ValueError(f"{where}: field {name!r} is not an object")
    for name, row in rec["techniques"].items():
        what = f"{where}: technique {name!r}"
        if not isinstance(row, dict):
            raise ValueError(f"{what} is not an object")
        _finite(row.get("wall_speedup"), f"{what} wall_speedup", positive=True)
        for key in ("wall_q1", "wall_q3", "flops_speedup", "work_ratio", "quality_delta"):
            _finite(row.get(key), f"{what} {key}", optional=True)
        if not isinstance(row.get("counts"), bool):
            raise ValueError(f"{what} counts is {row.get('counts')!r}; expected true or false")
    cum = rec["cumulative"]
    _finite(cum.get("speedup"), f"{where}: cumulative speedup", positive=True)
    if not isinstance(cum.get("counts"), bool) or not isinstance(cum.get("source"), str):
        raise ValueError(f"{where}: cumulative needs 'counts' (true/false) and 'source' (text)")
    return rec


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


def history(root: Path = BASELINES) -> list[dict[str, Any]]:
    """All records, oldest first (see ``records``)."""
    return [rec for _, rec in records(root)]


COMPARED_MACHINE = ("cpu", "cores", "torch", "torch_threads")


def setup_differences(rec: Mapping[str, Any], setup: Mapping[str, Any],
                      here: Mapping[str, Any] | None = None) -> list[str]:
    """How a measurement's setup (``Setup.describe()``) and machine differ from a record's:
    ``"field: record X, now Y"`` for each (the output folder does not matter)."""
    here = machine() if here is None else here
    recorded, recorded_machine = rec.get("setup", {}), rec.get("machine", {})
    differ = [f"{k}: record {recorded.get(k)!r}, now {setup.get(k)!r}"
              for k in sorted(set(recorded) | set(setup))
              if k != "output" and recorded.get(k) != setup.get(k)]
    differ += [f"machine {k}: record {recorded_machine.get(k)!r}, now {here.get(k)!r}"
               for k in COMPARED_MACHINE if recorded_machine.get(k) != here.get(k)]
    return differ


@dataclass(frozen=True)
class CheckRow:
    technique: str
    recorded: float
    measured: float
    quality_delta: float | None
    problem: str | None


def check(comparisons: list[Comparison], latest: dict[str, Any], target: Target, *,
          setup: Mapping[str, Any], tolerance: float | None = None) -> list[CheckRow]:
    """Compare fresh measurements with the latest record.

    Measurements of another setup (``setup_differences``) are not comparable: ``ValueError``
    naming the fields. A row fails when the speedup is not a finite number, falls more than
    ``tolerance`` (relative) below the recorded one, or when a technique that counted toward
    the target leaves the quality budget.
    """
    differ = setup_differences(latest, setup)
    if differ:
        raise ValueError(f"the latest record (commit {latest['commit'][:10]}) was measured with "
                         f"another setup ({'; '.join(differ)}); measure with the record's "
                         "setup, or record a new baseline")
    tolerance = target.check_tolerance if tolerance is None else tolerance
    rows = []
    for c in comparisons:
        old = latest["techniques"].get(c.name)
        if old is None:
            rows.append(CheckRow(c.name, float("nan"), c.wall_speedup, c.quality_delta, None))
            continue
        problem = None
        if not math.isfinite(c.wall_speedup):
            problem = f"measured speedup is {c.wall_speedup}"
        elif c.wall_speedup < old["wall_speedup"] * (1 - tolerance):
            problem = f"speedup fell more than {tolerance:.0%}"
        elif old["counts"] and not target.counts(c.quality_delta):
            problem = f"quality left the +{target.quality_budget:.0%} budget"
        rows.append(CheckRow(c.name, old["wall_speedup"], c.wall_speedup, c.quality_delta,
                             problem))
    return rows
