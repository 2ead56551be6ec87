"""Per-commit baseline records toward the cumulative 10x target.

``baselines/target.json`` states the target and the quality budget. ``baselines/records/`` holds
one JSON file per recorded commit, created once and never rewritten. The cumulative speedup of a
record is a measured figure: the wall speedup of the ``combined`` technique when one is
registered, otherwise the best single technique within the quality budget (a stack of one),
otherwise 1.0. Speedups are never multiplied on paper.
"""

from __future__ import annotations

import os
import platform
import subprocess
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
        data = read_json(root / "target.json")
        try:
            return cls(float(data["cumulative_speedup"]), float(data["quality_budget"]),
                       float(data["stretch_quality_budget"]), float(data["check_tolerance"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{root / 'target.json'} lacks a valid field: {err}") from err

    def counts(self, quality_delta: float | None) -> bool:
        return quality_delta is not None and quality_delta <= self.quality_budget


def git_commit(cwd: Path = BASELINES.parent) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise ValueError(f"cannot read the git commit in {cwd}: {err}") from err
    return out.stdout.strip()


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


def record(rec: dict[str, Any], root: Path = BASELINES) -> Path:
    """Write ``rec`` as a new file; an existing record for the same commit is never replaced."""
    stamp = rec["date"].replace(":", "").replace("-", "")[:15]
    path = records_dir(root) / f"{stamp}-{rec['commit'][:10]}.json"
    write_new(path, dump_json(rec))
    return path


def history(root: Path = BASELINES) -> list[dict[str, Any]]:
    """All records, oldest first; a corrupt record raises ``ValueError`` naming the file."""
    folder = records_dir(root)
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("schema") != 1 or "techniques" not in data:
            raise ValueError(f"{path} is not a bk-bench baseline record (schema 1)")
        records.append(data)
    return records


@dataclass(frozen=True)
class CheckRow:
    technique: str
    recorded: float
    measured: float
    quality_delta: float | None
    problem: str | None


def check(comparisons: list[Comparison], latest: dict[str, Any], target: Target,
          tolerance: float | None = None) -> list[CheckRow]:
    """Compare fresh measurements with the latest record.

    A row fails when the speedup falls more than ``tolerance`` (relative) below the recorded
    one, or when a technique that counted toward the target leaves the quality budget.
    """
    tolerance = target.check_tolerance if tolerance is None else tolerance
    rows = []
    for c in comparisons:
        old = latest["techniques"].get(c.name)
        if old is None:
            rows.append(CheckRow(c.name, float("nan"), c.wall_speedup, c.quality_delta, None))
            continue
        problem = None
        if c.wall_speedup < old["wall_speedup"] * (1 - tolerance):
            problem = f"speedup fell more than {tolerance:.0%}"
        elif old["counts"] and not target.counts(c.quality_delta):
            problem = f"quality left the +{target.quality_budget:.0%} budget"
        rows.append(CheckRow(c.name, old["wall_speedup"], c.wall_speedup, c.quality_delta,
                             problem))
    return rows
