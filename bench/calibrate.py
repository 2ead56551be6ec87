"""How far the CI gate can be trusted, measured the way the gate runs.

The gate (``bench.gate``) compares each gated ratio measured at the parent commit with the same
ratio at HEAD, each commit in its own environment: one fresh process trains the models into a
fresh folder, and each benchmark is measured in a fresh process of its own. A calibration makes
``runs`` such runs of identical code. In each:

* one fresh process trains the models into a fresh folder (``python -m bench.gate train``);
* for each gated benchmark, one fresh process measures its ratio (``python -m bench.gate
  measure``), and another measures it with the candidate slowed by exactly ``slowdown``: each
  batch's forward pass followed by a busy wait of that fraction of its median time.

Every ordered pair of runs ``(i, j)``, ``i != j``, is one comparison per benchmark: run ``i`` is
the parent, run ``j`` HEAD. The code is identical, so a flag on HEAD's ratio is a false alarm; a
flag on HEAD's slowed ratio is a detection and its absence a missed regression. The first ``p``
passes of a measurement are exactly a ``p``-pass measurement, so one calibration scores every
(passes, factor) of a grid, and ``choose`` picks the gate's settings from the scores.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import bench
from bench import gate
from bench.files import dump_json, read_json, write_atomic

ROOT = Path(bench.__file__).resolve().parent.parent  # the code every process imports
THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                  "NUMBA_NUM_THREADS")}  # as in asv.conf.json
PASSES = (7, 13, 25, 37)
FACTORS = (1.02, 1.03, 1.04, 1.05, 1.06, 1.08)


@dataclass(frozen=True)
class Measurement:
    """One benchmark measured in one process: its per-round ``t_dense / t_candidate``."""

    ratios: tuple[float, ...]
    batches: int  # rounds per pass over the workload

    @property
    def passes(self) -> int:
        return len(self.ratios) // self.batches

    def time_ratio(self, passes: int) -> float:
        """``t_candidate / t_dense`` as a measurement of the first ``passes`` passes reports it
        (``bench.gate.time_ratio``)."""
        if not 1 <= passes <= self.passes:
            raise ValueError(f"this measurement has 1 to {self.passes} passes, not {passes}")
        return 1 / statistics.median(self.ratios[:passes * self.batches])


Run = Mapping[str, tuple[Measurement, Measurement]]  # benchmark -> (as it is, slowed)


def pairs(runs: int) -> list[tuple[int, int]]:
    """Every ordered (parent, HEAD) pair of distinct runs."""
    return [(i, j) for i in range(runs) for j in range(runs) if i != j]


@dataclass(frozen=True)
class Score:
    """The gate's rule on one benchmark at one (passes, factor), over every pair of runs."""

    benchmark: str
    passes: int
    factor: float
    comparisons: int
    false_alarms: int  # identical code flagged
    detections: int  # slowed HEAD flagged
    largest_aa_change: float  # largest HEAD / parent ratio of identical code
    smallest_injected_change: float  # smallest slowed HEAD / parent ratio


def score(runs: Sequence[Run], benchmark: str, passes: int, factor: float) -> Score:
    plain = [run[benchmark][0].time_ratio(passes) for run in runs]
    slow = [run[benchmark][1].time_ratio(passes) for run in runs]
    both = pairs(len(runs))
    return Score(benchmark, passes, factor, len(both),
                 sum(gate.regressed(plain[i], plain[j], factor) for i, j in both),
                 sum(gate.regressed(plain[i], slow[j], factor) for i, j in both),
                 max(plain[j] / plain[i] for i, j in both),
                 min(slow[j] / plain[i] for i, j in both))


def gate_false_alarms(runs: Sequence[Run], passes: int, factor: float) -> int:
    """Pairs of identical runs in which the gate fails: any benchmark flagged."""
    return sum(any(gate.regressed(run_i[b][0].time_ratio(passes), run_j[b][0].time_ratio(passes),
                                  factor) for b in run_i)
               for run_i, run_j in ((runs[i], runs[j]) for i, j in pairs(len(runs))))


AA_MARGIN = 1.01  # a safe factor clears every A/A change the calibration saw by this much


def choose(runs: Sequence[Run], passes: Sequence[int],
           factors: Sequence[float]) -> tuple[int, float]:
    """The gate's (passes, factor). A failing gate blocks a commit, so the settings are first
    *safe*: the factor exceeds the largest A/A change of every benchmark by ``AA_MARGIN`` (so
    no pair of identical runs failed the gate, and a factor just above the noise seen does not
    fail on the next run). Then: the highest detection rate of the worst-detected benchmark
    minus the rate of gate false alarms; ties go to fewer passes (a faster gate), then to the
    factor furthest, in log scale, from both the largest A/A change and the smallest injected
    change. When no setting is safe, the best of the others."""
    n = len(pairs(len(runs)))

    def merit(p: int, f: float) -> tuple[bool, float, int, float]:
        scores = [score(runs, b, p, f) for b in runs[0]]
        worst_detection = min(s.detections for s in scores) / n
        largest_aa = max(s.largest_aa_change for s in scores)
        false_alarms = gate_false_alarms(runs, p, f)
        safe = f >= AA_MARGIN * largest_aa
        margin = min(math.log(f / largest_aa),
                     math.log(min(s.smallest_injected_change for s in scores) / f))
        return safe, worst_detection - false_alarms / n, -p, margin

    return max(((p, f) for p in passes for f in factors), key=lambda pf: merit(*pf))


@dataclass(frozen=True)
class Calibration:
    runs: int
    slowdown: float
    benchmarks: tuple[str, ...]
    passes: int  # chosen
    factor: float  # chosen
    scores: tuple[Score, ...]  # every benchmark at every (passes, factor) of the grid
    gate_false_alarms: dict[str, int]  # "passes x factor" -> pairs in which the gate failed
    measurements: tuple[dict[str, dict[str, Any]], ...]  # per run, per benchmark
    load_average: dict[str, tuple[float, ...]]
    seconds: float

    def chosen(self) -> list[Score]:
        return [s for s in self.scores if (s.passes, s.factor) == (self.passes, self.factor)]

    def summary(self) -> str:
        n = len(pairs(self.runs))
        failed = self.gate_false_alarms[f"{self.passes}x{self.factor}"]
        lines = [f"gate: factor {self.factor}, {self.passes} passes per ratio; {self.runs} runs, "
                 f"{n} ordered pairs; the gate failed on identical code in {failed} of {n}",
                 f"{'benchmark':<36}{'false alarms':>14}{'detected':>10}{'largest A/A':>13}"
                 f"{'smallest injected':>19}"]
        for s in self.chosen():
            lines.append(f"{s.benchmark:<36}{s.false_alarms:>8} of {n:<3}{s.detections:>4} of "
                         f"{n:<3}{s.largest_aa_change:>12.3f}x{s.smallest_injected_change:>18.3f}x")
        lines.append(f"(injected slowdown {self.slowdown:.0%}; load average "
                     f"{self.load_average['start']} at the start, {self.load_average['end']} at "
                     f"the end; {self.seconds / 60:.1f} min)")
        return "\n".join(lines)


def _process(*args: str, cwd: str) -> None:
    """``python -m bench.gate ARGS`` in a fresh process, one thread, importing this code."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.gate", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, **THREADS, "PYTHONPATH": path})
    if done.returncode != 0:
        raise RuntimeError(f"`python -m bench.gate {' '.join(args)}` failed (exit "
                           f"{done.returncode}):\n{done.stderr[-2000:]}")


def _measure(folder: str, benchmark: str, options: Sequence[str], passes: int,
             slowdown: float) -> Measurement:
    result = Path(folder) / "result.json"
    _process("measure", folder, benchmark, *options, "--passes", str(passes), "--slowdown",
             repr(slowdown), "--result", str(result), cwd=folder)
    data = read_json(result)
    return Measurement(tuple(data["ratios"]), data["batches"])


def _run(benchmarks: Sequence[str], slowdown: float, passes: int, corpus: str,
         steps: int) -> dict[str, tuple[Measurement, Measurement]]:
    options = ["--corpus", corpus, "--steps", str(steps)]
    with tempfile.TemporaryDirectory(prefix="bk-bench-gate-") as folder:
        names = dict.fromkeys(n for b in benchmarks for n in gate.measured_techniques(b))
        _process("train", folder, *options, "--techniques", *names, cwd=folder)
        return {b: (_measure(folder, b, options, passes, 0.0),
                    _measure(folder, b, options, passes, slowdown)) for b in benchmarks}


def calibrate(*, runs: int = 10, slowdown: float = 0.10, passes: Sequence[int] = PASSES,
              factors: Sequence[float] = FACTORS, benchmarks: Sequence[str] | None = None,
              corpus: str = "shakespeare", steps: int = gate.STEPS,
              output: Path = Path("runs"), gate_file: Path | None = None,
              progress: bool = True) -> Calibration:
    """Run the calibration, write ``<output>/calibration.json`` (every figure and measurement)
    and, given ``gate_file``, the chosen settings there (``baselines/gate.json`` is the gate's)."""
    chosen = list(benchmarks or gate.benchmarks())
    unknown = sorted(set(chosen) - set(gate.benchmarks()))
    if unknown:
        raise ValueError(f"not gated benchmarks: {unknown}; gated: {', '.join(gate.benchmarks())}")
    if runs < 2 or not 0 < slowdown < 1 or min(factors) <= 1 or min(passes) < 1:
        raise ValueError(f"need runs >= 2, 0 < slowdown < 1, factors > 1 and passes >= 1; got "
                         f"{runs}, {slowdown}, {list(factors)}, {list(passes)}")
    start, load = time.monotonic(), os.getloadavg()
    measured = [_run(chosen, slowdown, max(passes), corpus, steps)
                for _ in tqdm(range(runs), desc="calibrate", disable=not progress)]
    best_passes, best_factor = choose(measured, passes, factors)
    result = Calibration(
        runs, slowdown, tuple(chosen), best_passes, best_factor,
        tuple(score(measured, b, p, f) for p in passes for f in factors for b in chosen),
        {f"{p}x{f}": gate_false_alarms(measured, p, f) for p in passes for f in factors},
        tuple({b: {"plain": asdict(m[0]), "slowed": asdict(m[1])} for b, m in run.items()}
              for run in measured),
        {"start": tuple(round(x, 2) for x in load),
         "end": tuple(round(x, 2) for x in os.getloadavg())},
        time.monotonic() - start)
    print(result.summary())
    settings = {"runs": runs, "slowdown": slowdown, "passes": list(passes),
                "factors": list(factors), "corpus": corpus, "steps": steps}
    write_atomic(Path(output) / "calibration.json",
                 dump_json({"settings": settings, **asdict(result)}))
    if gate_file is not None:
        write_atomic(Path(gate_file), dump_json({
            "factor": best_factor, "passes": best_passes,
            "calibration": {**settings, "pairs": len(pairs(runs)),
                            "gate_false_alarms": result.gate_false_alarms[
                                f"{best_passes}x{best_factor}"],
                            "load_average": result.load_average,
                            "per_benchmark": {s.benchmark: {k: v for k, v in asdict(s).items()
                                                            if k != "benchmark"}
                                              for s in result.chosen()}}}))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=10,
                        help="runs of identical code, each trained and measured in fresh "
                             "processes; every ordered pair is one comparison (default 10)")
    parser.add_argument("--slowdown", type=float, default=0.10,
                        help="the injected regression of the candidate (default 0.10)")
    parser.add_argument("--passes", type=int, nargs="+", default=list(PASSES),
                        help="passes per ratio to score (measured at the largest)")
    parser.add_argument("--factors", type=float, nargs="+", default=list(FACTORS),
                        help="gate factors to score")
    parser.add_argument("--benchmarks", nargs="+", help="only these gated benchmarks")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--steps", type=int, default=gate.STEPS,
                        help=f"dense training steps per run (default {gate.STEPS}, as the gate)")
    parser.add_argument("--output", type=Path, default=Path("runs"))
    parser.add_argument("--gate-file", type=Path,
                        help=f"also write the chosen factor and passes here (the gate reads "
                             f"{gate.GATE_FILE})")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    calibrate(runs=args.runs, slowdown=args.slowdown, passes=args.passes, factors=args.factors,
              benchmarks=args.benchmarks, corpus=args.corpus, steps=args.steps,
              output=args.output, gate_file=args.gate_file, progress=not args.no_progress)
    return 0
