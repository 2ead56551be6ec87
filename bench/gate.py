"""The gated benchmarks, measured exactly as the CI gate measures them.

``.ci/gate`` runs ``asv continuous`` between the parent commit and HEAD on the
``track_*time_ratio`` benchmarks of ``suites/bench_techniques.py``. At each commit, asv trains
the models once in a fresh process into a fresh folder (``setup_cache``: ``STEPS`` dense steps
from fixed seeds, each technique fine-tuned from them), then runs each benchmark in a fresh
process of its own, which loads the models and times ``t_candidate / t_dense`` interleaved batch
by batch over ``passes`` passes of ``WORKLOAD_BATCHES`` test batches of 32 x 128 tokens. A
benchmark regresses when its ratio at HEAD exceeds the parent's by more than ``factor``
(``regressed``).

The suite and ``bk-bench calibrate`` both call this module, so the calibration measures what the
gate compares; ``baselines/gate.json`` holds the factor and passes the calibration chose.
``python -m bench.gate train|measure`` runs one of those processes (the calibration's).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.baselines import Target, cumulative_source
from bench.files import dump_json, read_json, write_atomic
from bench.measure import Call, Clock, Speedup, paired_speedup, timing_process
from bench.pipeline import Bench, Setup
from bench.registry import REFERENCE, techniques
from bk.train import evaluate

STEPS = 150  # dense training steps at each commit
WORKLOAD_BATCHES = 3
QUALITY_BATCHES = 20
GATE_FILE = Path("baselines") / "gate.json"  # relative to the repository root
CUMULATIVE = "track_cumulative_time_ratio"


def technique_benchmark(name: str) -> str:
    return f"track_time_ratio({name})"


def benchmarks() -> list[str]:
    """Every gated benchmark: one time ratio per technique, then the cumulative one."""
    return [technique_benchmark(name) for name in techniques() if name != REFERENCE] + [CUMULATIVE]


def measured_techniques(benchmark: str) -> list[str]:
    """The techniques a gated benchmark may time against the dense model (the cumulative one:
    any technique, ``measure_cumulative``)."""
    names = [name for name in techniques() if name != REFERENCE]
    if benchmark == CUMULATIVE:
        return names
    for name in names:
        if benchmark == technique_benchmark(name):
            return [name]
    raise ValueError(f"unknown gated benchmark {benchmark!r}; gated: {', '.join(benchmarks())}")


def regressed(parent: float, head: float, factor: float) -> bool:
    """asv's rule for a benchmark with one value per commit (a ``track_`` benchmark, lower is
    better): HEAD is worse when ``parent < head / factor``."""
    return parent < head / factor


@dataclass(frozen=True)
class GateSettings:
    factor: float  # a ratio that grows by more than this fails the gate
    passes: int  # passes over the workload per measured ratio

    @classmethod
    def load(cls, path: Path) -> GateSettings:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an object with factor and passes")
        factor, passes = data.get("factor"), data.get("passes")
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
            raise ValueError(f"{path}: factor must be a number > 1, got {factor!r}")
        if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
            raise ValueError(f"{path}: passes must be an integer >= 1, got {passes!r}")
        return cls(float(factor), passes)


@functools.cache
def bench(folder: str, corpus: str = "shakespeare", steps: int = STEPS,
          target: Target | None = None) -> Bench:
    """The models and workload of one commit's gate, trained into (or loaded from) ``folder``;
    ``target``: whose quality budget the cumulative benchmark applies (default the repository's
    ``baselines/target.json``, which an installed package does not have: the asv suite passes
    the one beside it)."""
    return Bench(Setup(corpus=corpus, steps=steps, workload_batches=WORKLOAD_BATCHES,
                       quality_batches=QUALITY_BATCHES, output=Path(folder), progress=False),
                 target=target)


def train_all(folder: str, corpus: str = "shakespeare", steps: int = STEPS,
              names: Sequence[str] | None = None) -> str:
    """Train the dense model and every technique (or those ``names``) into ``folder``: asv's
    ``setup_cache``. Training is seeded, so each is the same model whatever else is trained."""
    b = bench(folder, corpus, steps)
    for name in names or techniques():
        b.candidate(name)
    return folder


def busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def slowed(call: Call, slowdown: float, *, clock: Clock = time.perf_counter,
           wait: Callable[[float], None] = busy_wait) -> Call:
    """``call`` followed by a wait of ``slowdown`` times its median duration (of 9, measured
    now), so it takes ``1 + slowdown`` times as long: an exactly known regression."""
    call()
    durations = sorted(timeit.Timer(call, timer=clock).repeat(repeat=9, number=1))
    extra = slowdown * durations[len(durations) // 2]

    def run() -> None:
        call()
        wait(extra)

    return run


def measure_technique(b: Bench, name: str, passes: int, *, slowdown: float = 0.0,
                      clock: Clock = time.perf_counter,
                      wait: Callable[[float], None] = busy_wait) -> Speedup:
    """``t_dense / t_candidate`` of technique ``name`` over ``passes`` passes of the workload,
    the candidate slowed by ``slowdown`` (0: as it is)."""
    workload = b.workload
    dense, candidate = workload.calls(b.dense()), workload.calls(b.candidate(name))
    if slowdown:
        candidate = [slowed(call, slowdown, clock=clock, wait=wait) for call in candidate]
    return paired_speedup(dense, candidate, rounds=passes * len(workload.batches), clock=clock)


def measure_cumulative(b: Bench, passes: int, *, slowdown: float = 0.0,
                       measure: Callable[[str], Speedup] | None = None) -> Speedup:
    """The speed of the records' cumulative figure (``baselines.cumulative_source``): the
    combined model when it is within the quality budget, else the fastest technique within
    budget if it beats the dense model, else the dense model against itself. Quality on
    ``b.setup.quality_batches`` test batches; each technique is timed at most once
    (``measure``: by default ``measure_technique``)."""
    budget = b.setup.quality_batches

    @functools.cache
    def speed(name: str) -> Speedup:
        if measure is not None:
            return measure(name)
        return measure_technique(b, name, passes, slowdown=slowdown)

    def counts(name: str) -> bool:
        delta = (evaluate(b.candidate(name), b.corpus, max_batches=budget).perplexity
                 / evaluate(b.reference(name), b.corpus, max_batches=budget).perplexity - 1)
        return b.target.counts(delta)

    names = [name for name in techniques() if name != REFERENCE]
    source = cumulative_source(names, counts, lambda name: speed(name).speedup)
    return speed(REFERENCE if source is None else source)


def measure(b: Bench, benchmark: str, passes: int, *, slowdown: float = 0.0) -> Speedup:
    """One gated benchmark (a name from ``benchmarks()``) as its asv process measures it."""
    if benchmark == CUMULATIVE:
        return measure_cumulative(b, passes, slowdown=slowdown)
    [name] = measured_techniques(benchmark)
    return measure_technique(b, name, passes, slowdown=slowdown)


def time_ratio(speed: Speedup) -> float:
    """What a gated benchmark reports: ``t_candidate / t_dense``, lower is better (asv has no
    higher-is-better)."""
    return 1 / speed.speedup


def main(argv: list[str] | None = None) -> int:
    """One process of the gate: ``train FOLDER`` (asv's ``setup_cache``), or ``measure FOLDER
    BENCHMARK --result FILE`` (one benchmark's process; writes its per-round ratios
    ``t_dense / t_candidate`` to FILE)."""
    timing_process()
    parser = argparse.ArgumentParser(prog="python -m bench.gate")
    parser.add_argument("action", choices=["train", "measure"])
    parser.add_argument("folder")
    parser.add_argument("benchmark", nargs="?")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--slowdown", type=float, default=0.0)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--techniques", nargs="+", help="train only these (default: all)")
    args = parser.parse_args(argv)
    if args.action == "train":
        train_all(args.folder, args.corpus, args.steps, args.techniques)
        return 0
    if args.benchmark is None or args.result is None:
        parser.error("measure needs a BENCHMARK and --result FILE")
    b = bench(args.folder, args.corpus, args.steps)
    speed = measure(b, args.benchmark, args.passes, slowdown=args.slowdown)
    write_atomic(args.result, dump_json({"ratios": speed.ratios,
                                         "batches": len(b.workload.batches)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
