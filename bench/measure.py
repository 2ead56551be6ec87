"""Honest measurement: paired wall-clock speedups, FLOPs, executed work and quality.

A speedup is ``t_reference / t_candidate`` timed in one process, interleaved (each round times
both, alternating which goes first), on one torch thread, after warm-up; the reported figure is
the median of the per-round ratios with its interquartile range. Raw timings of identical code
in separate processes moved by up to 40% on this machine kind, ratios in one process by about 3%,
so only ratios are trusted.
"""

from __future__ import annotations

import ctypes
import math
import platform
import statistics
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from bench.rows import Row
from bk.data import Corpus
from bk.model import ModelConfig, Work
from bk.technique import KnobValue
from bk.train import evaluate, torch_threads

NOISE_LIMIT = 0.10  # relative interquartile range above which a speedup is flagged as noisy

# mallopt(3) parameters of glibc, and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
_TRIM_NEVER = 2**31 - 1
freed_memory_kept = False  # whether keep_freed_memory() is in force in this process


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it
    to the system; True if it is in force (False where the C library is not glibc).

    By default glibc serves a large block from freshly mapped pages and trims the top of its
    heap once enough is free at the end, so a forward that allocates and frees tensors of a
    few hundred kilobytes faults every page of them in again, call after call: system time
    that every model pays in proportion to its temporaries, and whose price moves with the
    machine's state (docs/timing.md has the figures). Here blocks up to 32 MiB come from the
    heap and the heap is never trimmed, so a process's memory stays at its peak. It is set for
    the whole process, the reference and the candidates alike, before anything is timed.
    """
    global freed_memory_kept
    if not freed_memory_kept and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        freed_memory_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                                 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return freed_memory_kept


def timing_process() -> None:
    """Set this process up as every bk-bench process that times is set up: one torch thread
    (two threads on two cores were ~10x noisier) and freed memory kept by the allocator
    (``keep_freed_memory``)."""
    torch.set_num_threads(1)
    keep_freed_memory()


@dataclass(frozen=True)
class Speedup:
    """Median of per-round ``t_ref / t_cand`` and its interquartile range."""

    ratios: tuple[float, ...]
    t_reference: float  # median seconds per call
    t_candidate: float

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)

    @property
    def q1(self) -> float:
        return _quantile(self.ratios, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.ratios, 0.75)

    @property
    def rounds(self) -> int:
        return len(self.ratios)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.speedup

    @property
    def warning(self) -> str | None:
        if self.spread > NOISE_LIMIT:
            return (f"noisy: interquartile spread {self.spread:.0%} of the median exceeds "
                    f"{NOISE_LIMIT:.0%}; re-run with more rounds on a quieter machine")
        return None


def _quantile(values: tuple[float, ...], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


Call = Callable[[], object]
Clock = Callable[[], float]  # seconds since an arbitrary origin, like time.perf_counter


def paired_speedup(reference: Call | Sequence[Call], candidate: Call | Sequence[Call], *,
                   rounds: int = 7, warmup: int = 1, number: int = 1, threads: int = 1,
                   clock: Clock = time.perf_counter,
                   after_round: Callable[[], None] | None = None) -> Speedup:
    """Time ``reference`` and ``candidate`` alternately in this process and compare them.

    Either may be one callable or a sequence of paired callables (for example one per batch of
    a workload): round ``r`` times pair ``r mod len`` on both sides, alternating which goes
    first, so a disturbance lasting longer than a round hits both sides alike. Each timing is
    ``timeit.Timer(fn, timer=clock).timeit(number) / number`` (the standard library's timer:
    garbage collection paused); torch's benchmark Timer was not used because its ``timeit``
    runs extra warm-up calls inside every measurement. Tests pass a fake ``clock`` that the
    callables advance, so every figure can be checked exactly. ``after_round`` runs after each
    round (progress reporting), outside the timings.
    """
    refs = list(reference) if isinstance(reference, Sequence) else [reference]
    cands = list(candidate) if isinstance(candidate, Sequence) else [candidate]
    if len(refs) != len(cands) or not refs:
        raise ValueError(f"need as many reference as candidate callables (>= 1), got "
                         f"{len(refs)} and {len(cands)}")
    if rounds < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, number >= 1, warmup >= 0; got {rounds}, {number}, "
                         f"{warmup}")
    timers = [(timeit.Timer(r, timer=clock), timeit.Timer(c, timer=clock))
              for r, c in zip(refs, cands, strict=True)]
    with torch_threads(threads):
        for _ in range(warmup):
            for r, c in zip(refs, cands, strict=True):
                r()
                c()
        ratios, t_ref, t_cand = [], [], []
        for r in range(rounds):
            pair = timers[r % len(timers)]
            order = (0, 1) if r % 2 == 0 else (1, 0)
            seconds = [0.0, 0.0]
            for i in order:
                seconds[i] = pair[i].timeit(number) / number
            t_ref.append(seconds[0])
            t_cand.append(seconds[1])
            ratios.append(seconds[0] / seconds[1])
            if after_round is not None:
                after_round()
    return Speedup(tuple(ratios), statistics.median(t_ref), statistics.median(t_cand))


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int], *args: Any,
                      out_shape: Sequence[int], **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm`` (the mixture of experts' matrix products), which torch's
    counter does not count: 2 per multiply-add, as for ``mm``. Two matrices (groups split the
    contracted dimension, a weight gradient): ``2 M K N``; otherwise each output element is one
    dot product over the last dimension of ``a``."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations torch's FlopCounterMode attributes to ``fn()``.

    It counts matrix products and convolutions; elementwise work such as the O(N) BK recurrence
    is not counted, which is why FLOPs stand beside wall time and never replace it.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Workload:
    """Inputs for repeated forward passes: the test split in ``batch_size x seq_len`` batches."""

    name: str
    batches: list[torch.Tensor]

    @classmethod
    def from_corpus(cls, corpus: Corpus, *, split: str = "test", batch_size: int = 32,
                    seq_len: int = 128, max_batches: int | None = None) -> Workload:
        batches = []
        for x, _ in corpus.batches(split, batch_size, seq_len, drop_last=True):
            if max_batches is not None and len(batches) >= max_batches:
                break
            batches.append(x)
        if not batches:
            raise ValueError(f"split {split!r} of {corpus.name!r} is shorter than one "
                             f"{batch_size} x {seq_len} batch")
        return cls(f"{corpus.name}/{split} {len(batches)}x{batch_size}x{seq_len}", batches)

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def calls(self, model: nn.Module) -> list[Callable[[], object]]:
        """One no-grad forward pass per batch, for per-batch interleaved timing."""
        model.eval()

        def forward(x: torch.Tensor) -> Callable[[], object]:
            return torch.no_grad()(lambda: model(x))

        return [forward(x) for x in self.batches]

    def paired(self, reference: nn.Module, candidate: nn.Module, *, passes: int = 7,
               threads: int = 1, clock: Clock = time.perf_counter,
               after_round: Callable[[], None] | None = None) -> Speedup:
        """Paired speedup over ``passes`` passes of the workload, interleaved batch by batch."""
        return paired_speedup(self.calls(reference), self.calls(candidate),
                              rounds=passes * len(self.batches), threads=threads, clock=clock,
                              after_round=after_round)

    @torch.no_grad()
    def account(self, model: nn.Module) -> tuple[Work, dict[str, float]]:
        """One no-grad pass of ``model`` over every batch: the work it executed, and every
        per-token statistic it reports averaged over the workload's tokens (``mean_<name>``)."""
        model.eval()
        work, sums = Work(), {}
        for x in self.batches:
            out = model(x)
            work = work + out.work
            for name, value in out.stats.items():
                sums[name] = sums.get(name, 0.0) + float(value.double().sum())
        return work, {f"mean_{name}": total / self.tokens for name, total in sums.items()}


def compare(name: str, reference: nn.Module, candidate: nn.Module, workload: Workload, *,
            scale: str, knobs: Mapping[str, KnobValue] | None = None,
            cfg: ModelConfig | None = None, corpus: Corpus | None = None, rounds: int = 3,
            flop_batches: int = 2, quality_batches: int | None = None, threads: int = 1,
            clock: Clock = time.perf_counter,
            after_round: Callable[[], None] | None = None) -> Row:
    """Measure ``candidate`` against ``reference``: paired wall time, FLOPs, work, quality.

    Wall time: ``rounds`` passes over the workload, interleaved batch by batch
    (``after_round`` runs after each timed round). FLOPs are counted on the first
    ``flop_batches`` batches (the counter is slow); executed work over the whole workload, in
    FLOPs of ``cfg`` (default: the reference's); quality on the test split of ``corpus`` when
    given.
    """
    cfg = reference.cfg if cfg is None else cfg
    speed = workload.paired(reference, candidate, passes=rounds, threads=threads, clock=clock,
                            after_round=after_round)
    sample = Workload(workload.name, workload.batches[:flop_batches])
    flops_ref = count_flops(lambda: sample.account(reference))
    flops_cand = count_flops(lambda: sample.account(candidate))
    work_ref, _ = workload.account(reference)
    work_cand, stats = workload.account(candidate)
    quality: dict[str, float] = {}
    if corpus is not None:
        ref, cand = (evaluate(m, corpus, "test", max_batches=quality_batches).perplexity
                     for m in (reference, candidate))
        quality = {"reference_perplexity": ref, "candidate_perplexity": cand,
                   "quality_delta": cand / ref - 1}
    return Row(technique=name, scale=scale, knobs=dict(knobs or {}), **speed_figures(speed),
               flops_speedup=flops_ref / max(1, flops_cand),
               work_ratio=work_cand.flops(cfg) / work_ref.flops(cfg),
               token_layers=work_cand.token_layers, expert_calls=work_cand.expert_calls,
               positions=work_cand.positions, stats=stats, **quality)


def speed_figures(speed: Speedup) -> dict[str, Any]:
    """The wall-time fields of a ``Row``."""
    return {"wall_speedup": speed.speedup, "wall_q1": speed.q1, "wall_q3": speed.q3,
            "rounds": speed.rounds, "noise_warning": speed.warning,
            "t_reference_s": speed.t_reference, "t_candidate_s": speed.t_candidate}
