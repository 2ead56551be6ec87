"""Ceilings: how fast a technique's own skip path runs when its decisions cost nothing.

A technique's *ceiling* is the paired wall speedup over the dense model of the technique's model
forced (``TechniqueModel.forced``) to skip at a given rate, with no predictor, halting unit or
exit head deciding: the most its implementation could deliver at that rate. Its *ideal* is the
speedup the skipped work promises, ``dense FLOPs / executed FLOPs`` of the work that ran
(``bk.model.Work.flops``). Between the three figures lie two losses:

* implementation overhead, ``1 - ceiling / ideal``: gathers, scatters, per-op fixed costs and
  the work the technique does not skip (for example the recurrence);
* decision cost, ``1 - realised / ceiling``: what the trained technique spends on deciding
  (predictors, exit heads) and on deciding heterogeneously.

Ceilings need no training (forced decisions do not depend on the weights), so ``bk-bench
ceilings`` measures them on freshly initialised models at any scale, on random tokens. In
``bk-bench run`` each trained technique's row gets its ceilings at the keep rate whose executed
work matches the work it really ran (``realised_ceilings``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.measure import Clock, Speedup, Workload
from bench.registry import REFERENCE, Technique
from bench.rows import PATTERNS, Row
from bk.model import LanguageModel, ModelConfig, Work
from bk.technique import Forcing, TechniqueModel

VOCAB = 80  # the shakespeare corpus's characters: the head costs what it costs in a run


@dataclass(frozen=True)
class Ceiling:
    technique: str
    scale: str
    pattern: str
    keep: float  # the forced rate of the technique's skippable unit
    speed: Speedup  # t_dense / t_forced
    work: Work  # executed by the forced model over the workload
    dense_work: Work  # executed by the dense model over the workload
    work_ratio: float  # executed FLOPs of the forced model over the dense model's

    @property
    def ideal(self) -> float:
        return 1 / self.work_ratio

    @property
    def overhead(self) -> float:
        """Implementation overhead: the share of the ideal speedup the forced model loses."""
        return 1 - self.speed.speedup / self.ideal

    def ran(self, unit: str) -> float:
        """The share of the dense model's ``unit`` (token_layers, expert_calls, positions)
        the forced model ran."""
        dense = getattr(self.dense_work, unit)
        return getattr(self.work, unit) / dense if dense else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, "scale": self.scale, "pattern": self.pattern,
                "keep": self.keep, "ceiling": self.speed.speedup, "ceiling_q1": self.speed.q1,
                "ceiling_q3": self.speed.q3, "rounds": self.speed.rounds,
                "noise_warning": self.speed.warning, "t_dense_s": self.speed.t_reference,
                "t_forced_s": self.speed.t_candidate, "work_ratio": self.work_ratio,
                "ideal": self.ideal, "overhead": self.overhead,
                "flops_skipped": 1 - self.work_ratio,
                **{f"{unit}_ran": self.ran(unit)
                   for unit in ("token_layers", "expert_calls", "positions")}}


def makes_decisions(model: nn.Module) -> bool:
    """Whether ``model`` decides what to skip: it has a forced path (``TechniqueModel.forced``
    is not None)."""
    return isinstance(model, TechniqueModel) and model.forced(Forcing(1.0)) is not None


def pair(technique: Technique, cfg: ModelConfig, seed: int = 0
         ) -> tuple[LanguageModel, TechniqueModel]:
    """A freshly initialised dense model and the technique's model holding its weights."""
    torch.manual_seed(seed)
    dense = LanguageModel(cfg).eval()
    model = technique.make(cfg)
    if not isinstance(model, TechniqueModel):
        raise TypeError(f"technique {technique.name!r} does not build a TechniqueModel")
    model.load_state_dict(dense.state_dict(), strict=False)
    return dense, model.eval()


def executed_flops(model: nn.Module, workload: Workload, cfg: ModelConfig) -> float:
    work, _ = workload.account(model)
    return work.flops(cfg)


def flops_ratio(model: nn.Module, dense: nn.Module, workload: Workload,
                cfg: ModelConfig) -> float:
    return executed_flops(model, workload, cfg) / executed_flops(dense, workload, cfg)


def matching_keep(model: TechniqueModel, dense: nn.Module, pattern: str, target: float,
                  workload: Workload, cfg: ModelConfig, steps: int = 10) -> float:
    """The keep rate at which the forced model executes ``target`` of the dense FLOPs (the work
    ratio a trained technique actually ran), by bisection on the workload's first batch; forced
    work grows with keep. Clamped to [2**-steps, 1]."""
    probe = Workload(workload.name, workload.batches[:1])
    dense_flops = executed_flops(dense, probe, cfg)
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        forced = model.forced(Forcing(mid, pattern))
        if executed_flops(forced, probe, cfg) / dense_flops < target:
            low = mid
        else:
            high = mid
    return high


def measure_ceiling(name: str, scale: str, dense: nn.Module, model: TechniqueModel,
                    forcing: Forcing, workload: Workload, cfg: ModelConfig, passes: int = 3,
                    after_round: Callable[[], None] | None = None,
                    clock: Clock = time.perf_counter) -> Ceiling | None:
    """The ceiling of ``model`` forced by ``forcing``; None if it makes no decisions."""
    forced = model.forced(forcing)
    if forced is None:
        return None
    speed = workload.paired(dense, forced, passes=passes, after_round=after_round, clock=clock)
    work, _ = workload.account(forced)
    dense_work, _ = workload.account(dense)
    return Ceiling(name, scale, forcing.pattern, forcing.keep, speed, work, dense_work,
                   work.flops(cfg) / dense_work.flops(cfg))


def ceilings(techniques: Iterable[Technique], cfg: ModelConfig, workload: Workload, *,
             scale: str, keep: float = 0.5, passes: int = 3,
             after_round: Callable[[], None] | None = None) -> list[Ceiling]:
    """Every technique's ceiling at ``keep`` in both patterns (no training needed)."""
    rows = []
    for technique in techniques:
        dense, model = pair(technique, cfg)
        for pattern in PATTERNS:
            row = measure_ceiling(technique.name, scale, dense, model, Forcing(keep, pattern),
                                  workload, cfg, passes, after_round)
            if row is not None:
                rows.append(row)
    return rows


def realised_ceilings(candidate: nn.Module, reference: nn.Module, row: Row,
                      workload: Workload, *, passes: int = 3,
                      after_round: Callable[[], None] | None = None,
                      clock: Clock = time.perf_counter) -> dict[str, Any]:
    """The ceiling fields of a trained technique's ``row``: in each pattern, the keep rate at
    which its forced model executes the work ``row`` measured (``row.work_ratio``) and the
    forced model's speedup over ``reference`` there. A model that makes no decisions has its
    realised speedup as its ceiling (decisions "none")."""
    if not makes_decisions(candidate):
        return {"decisions": "none", "ceiling_uniform": row.wall_speedup,
                "ceiling_per_token": row.wall_speedup}
    cfg = reference.cfg
    figures: dict[str, Any] = {"decisions": "learned"}
    for pattern in PATTERNS:
        keep = matching_keep(candidate, reference, pattern, row.work_ratio, workload, cfg)
        forced = candidate.forced(Forcing(keep, pattern))
        speed = workload.paired(reference, forced, passes=passes, after_round=after_round,
                                clock=clock)
        figures[f"keep_{pattern}"] = keep
        figures[f"ceiling_{pattern}"] = speed.speedup
    return figures


def random_workload(cfg: ModelConfig, batches: int = 3, batch_size: int = 32,
                    seed: int = 0) -> Workload:
    """Random token batches: forced decisions do not read the text."""
    generator = torch.Generator().manual_seed(seed)
    return Workload(f"random {batches}x{batch_size}x{cfg.n_seq}",
                    [torch.randint(cfg.vocab_size, (batch_size, cfg.n_seq), generator=generator)
                     for _ in range(batches)])


# ----------------------------------------------------------------------------- bk-bench ceilings

def keep_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.cli import positive_int, scale_name

    parser.add_argument("--scale", nargs="+", type=scale_name, default=["small"],
                        help="model scales to measure at (default small)")
    parser.add_argument("--keep", type=keep_rate, default=0.5,
                        help="forced keep rate of each technique's skippable unit (default 0.5)")
    parser.add_argument("--techniques", nargs="+", help="only these registered techniques")
    parser.add_argument("--batches", type=positive_int, default=3,
                        help="random token batches timed (default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--passes", type=positive_int, default=3,
                        help="passes over the batches, timed interleaved (default 3)")
    parser.add_argument("--output", type=Path, default=Path("runs"),
                        help="folder for ceilings.json and ceilings.csv (default runs/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench.files import dump_json, publish
    from bench.progress import Phase, Progress
    from bench.registry import get, techniques

    chosen = [get(name) for name in (args.techniques or techniques()) if name != REFERENCE]
    if not chosen:
        raise ValueError("--techniques names no technique besides dense")
    units = len(PATTERNS) * args.passes * args.batches
    progress = Progress([Phase(f"{scale} {t.name}", units, "ceiling", "rounds")
                         for scale in args.scale for t in chosen],
                        title="bk-bench ceilings", live=False if args.no_progress else None)
    found: list[Ceiling] = []
    for scale in args.scale:
        cfg = ModelConfig.at_scale(scale, vocab_size=VOCAB, n_seq=args.seq_len)
        workload = random_workload(cfg, args.batches, args.batch_size)
        for technique in chosen:
            with progress.phase(f"{scale} {technique.name}") as advance:
                found += ceilings([technique], cfg, workload, scale=scale, keep=args.keep,
                                  passes=args.passes, after_round=advance)
    progress.close()
    table = pd.DataFrame([c.to_dict() for c in found])
    publish(args.output, "ceilings", {"ceilings.json": dump_json([c.to_dict() for c in found]),
                                      "ceilings.csv": table.to_csv(index=False)})
    if not found:
        print("no chosen technique makes decisions: no ceiling to measure")
        return 0
    shown = table[["scale", "technique", "pattern", "keep", "ceiling", "ideal", "overhead",
                   "flops_skipped", "token_layers_ran", "positions_ran", "expert_calls_ran"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nceiling: t_dense / t_forced at keep {args.keep:g} (paired, one thread, random "
          f"tokens, untrained weights); ideal: dense FLOPs / executed FLOPs; overhead: "
          f"1 - ceiling / ideal")
    noisy = [f"{c.scale} {c.technique} {c.pattern}" for c in found if c.speed.warning]
    if noisy:
        print(f"noisy (interquartile spread > 10%): {', '.join(noisy)}")
    print(f"written: {args.output / 'ceilings.json'}, {args.output / 'ceilings.csv'}")
    return 0
