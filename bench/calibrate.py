"""How far the CI gate can be trusted, measured.

The gate (``asv continuous`` over the ``track_`` benchmarks) compares a time ratio
``t_candidate / t_reference`` measured in one process at the parent commit with the same ratio at
HEAD, and flags HEAD when the ratio grew by more than ``factor``. This module runs that decision
rule on ratios measured exactly as the ``track_`` benchmarks measure them
(``bench.measure.paired_speedup``):

* A/A: parent and HEAD are the same code, so every flag is a false alarm;
* injected slowdown: HEAD's candidate is the same forward pass followed by a busy wait of
  ``slowdown`` times that batch's median forward time (measured once beforehand), so it takes
  exactly ``1 + slowdown`` times as long; every miss is a missed regression.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.files import dump_json, write_atomic
from bench.measure import Workload, paired_speedup
from bk.model import LanguageModel, ModelConfig


def _slowed(call: Callable[[], object], slowdown: float) -> Callable[[], None]:
    """``call`` followed by a busy wait of ``slowdown`` times its median duration."""
    call()
    durations = sorted(timeit.Timer(call).repeat(repeat=9, number=1))
    extra = slowdown * durations[len(durations) // 2]

    def run() -> None:
        call()
        end = time.perf_counter() + extra
        while time.perf_counter() < end:
            pass

    return run


@dataclass(frozen=True)
class Calibration:
    comparisons: int
    false_alarms: int
    detections: int
    factor: float
    slowdown: float
    aa_changes: tuple[float, ...]  # head ratio / parent ratio, identical code
    injected_changes: tuple[float, ...]  # head ratio / parent ratio, slowed candidate

    def summary(self) -> str:
        return (f"gate factor {self.factor}: {self.false_alarms} false alarms in "
                f"{self.comparisons} A/A comparisons (largest change "
                f"{max(self.aa_changes):.3f}x); injected {self.slowdown:.0%} slowdown detected "
                f"in {self.detections} of {self.comparisons} (smallest change "
                f"{min(self.injected_changes):.3f}x)")


def calibrate(*, comparisons: int = 20, slowdown: float = 0.10, factor: float = 1.05,
              rounds: int = 25, batches: int = 3, output: Path | None = None,
              progress: bool = True) -> Calibration:
    """``rounds`` passes over ``batches`` batches of 32 x 128 tokens per measurement, as in the
    ``track_`` benchmarks (3 batches, 25 passes)."""
    if not 0 < slowdown < 1 or factor <= 1:
        raise ValueError(f"need 0 < slowdown < 1 and factor > 1, got {slowdown}, {factor}")
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=80)).eval()
    workload = Workload("calibration", [torch.randint(0, 80, (32, 128)) for _ in range(batches)])
    reference, same = workload.calls(model), workload.calls(model)
    slower = [_slowed(call, slowdown) for call in workload.calls(model)]

    def ratio(candidate) -> float:  # t_candidate / t_reference, as the track_ benchmarks report
        return 1 / paired_speedup(reference, candidate, rounds=rounds * batches).speedup

    aa, injected = [], []
    for _ in tqdm(range(comparisons), desc="calibrate", disable=not progress):
        parent = ratio(same)
        aa.append(ratio(same) / parent)
        injected.append(ratio(slower) / parent)
    result = Calibration(comparisons, sum(c > factor for c in aa),
                         sum(c > factor for c in injected), factor, slowdown,
                         tuple(aa), tuple(injected))
    print(result.summary())
    if output is not None:
        write_atomic(Path(output) / "calibration.json", dump_json(result.__dict__))
    return result
