"""Every registered technique against the dense model, as in-process time ratios.

Raw asv timings of identical code moved by up to 40% between processes on this machine kind;
a ratio timed interleaved in one process moved about 3%. So the gated quantity is
``t_candidate / t_dense`` (lower is better: asv has no higher-is-better), with the speedup beside
it for reading. Models are trained briefly once per environment and commit (``setup_cache``) from
fixed seeds; the authoritative trained figures with quality are the records in ``baselines/``.
"""

import os
from pathlib import Path

import torch

from bench.baselines import COMBINED, Target
from bench.pipeline import Bench
from bench.pipeline import Setup as BenchSetup  # asv would take a module-level `Setup` for setup
from bench.registry import REFERENCE, techniques
from bk.train import evaluate

torch.set_num_threads(1)

NAMES = [name for name in techniques() if name != REFERENCE]
_BENCHES: dict[str, Bench] = {}


def bench(cache: str) -> Bench:
    if cache not in _BENCHES:
        setup = BenchSetup(steps=150, rounds=25, workload_batches=3, quality_batches=20,
                      output=Path(cache), progress=False)
        _BENCHES[cache] = Bench(setup)
    return _BENCHES[cache]


def train_all() -> str:
    cache = os.path.abspath("bk-bench-models")
    b = bench(cache)
    for name in NAMES:
        b.candidate(name)
    return cache


def measured_time_ratio(b: Bench, name: str) -> float:
    return 1 / b.workload.paired(b.dense(), b.candidate(name), passes=b.setup.rounds).speedup


class Technique:
    params = NAMES
    param_names = ["technique"]
    timeout = 900

    def setup_cache(self):
        return train_all()

    def track_time_ratio(self, cache, name):
        return measured_time_ratio(bench(cache), name)

    track_time_ratio.unit = "t_candidate / t_dense"

    def track_speedup(self, cache, name):
        return 1 / measured_time_ratio(bench(cache), name)

    track_speedup.unit = "x (not gated: asv reads a rise as a regression)"


class Cumulative:
    """The combined model when registered, else the best technique within the quality budget."""

    timeout = 900

    def setup_cache(self):
        return train_all()

    def track_cumulative_time_ratio(self, cache):
        b = bench(cache)
        if COMBINED in NAMES:
            return measured_time_ratio(b, COMBINED)
        target = Target.load()
        ratios = [1.0]
        for name in NAMES:
            ppl, ref = (evaluate(m, b.corpus, max_batches=b.setup.quality_batches).perplexity
                        for m in (b.candidate(name), b.reference(name)))
            if target.counts(ppl / ref - 1):
                ratios.append(measured_time_ratio(b, name))
        return min(ratios)

    track_cumulative_time_ratio.unit = "t_combined / t_dense"
