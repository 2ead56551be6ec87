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

Ceilings need no training (forced decisions do not depend on the weights), so they are measured
on freshly initialised models at any scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from bench.measure import Speedup, Workload
from bench.registry import Technique
from bk.model import LanguageModel, ModelConfig
from bk.technique import Forcing, TechniqueModel

PATTERNS = ("uniform", "per_token")


@dataclass(frozen=True)
class Ceiling:
    technique: str
    pattern: str
    keep: float  # the forced rate of the technique's skippable unit
    speed: Speedup  # t_dense / t_forced
    work_ratio: float  # executed FLOPs of the forced model over the dense model's

    @property
    def ideal(self) -> float:
        return 1 / self.work_ratio

    @property
    def overhead(self) -> float:
        """Implementation overhead: the share of the ideal speedup the forced model loses."""
        return 1 - self.speed.speedup / self.ideal


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


def flops_ratio(model: torch.nn.Module, dense: torch.nn.Module, workload: Workload,
                cfg: ModelConfig) -> float:
    work, _ = workload.account(model)
    dense_work, _ = workload.account(dense)
    return work.flops(cfg) / dense_work.flops(cfg)


def matching_keep(model: TechniqueModel, dense: LanguageModel, pattern: str, target: float,
                  workload: Workload, cfg: ModelConfig, steps: int = 10) -> float:
    """The keep rate at which the forced model executes ``target`` of the dense FLOPs (the work
    ratio a trained technique actually ran), by bisection; forced work grows with keep."""
    probe = Workload(workload.name, workload.batches[:1])
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        forced = model.forced(Forcing(max(mid, 1e-3), pattern))
        if flops_ratio(forced, dense, probe, cfg) < target:
            low = mid
        else:
            high = mid
    return max(high, 1e-3)


def measure_ceiling(technique: Technique, dense: LanguageModel, model: TechniqueModel,
                    forcing: Forcing, workload: Workload, cfg: ModelConfig,
                    passes: int = 3) -> Ceiling | None:
    """The ceiling of ``model`` forced by ``forcing``; None if it makes no decisions."""
    forced = model.forced(forcing)
    if forced is None:
        return None
    speed = workload.paired(dense, forced, passes=passes)
    return Ceiling(technique.name, forcing.pattern, forcing.keep, speed,
                   flops_ratio(forced, dense, workload, cfg))


def ceilings(techniques: Iterable[Technique], cfg: ModelConfig, workload: Workload, *,
             keep: float = 0.5, passes: int = 3) -> list[Ceiling]:
    """Every technique's ceiling at ``keep`` in both patterns (no training needed)."""
    rows = []
    for technique in techniques:
        dense, model = pair(technique, cfg)
        for pattern in PATTERNS:
            row = measure_ceiling(technique, dense, model, Forcing(keep, pattern), workload, cfg,
                                  passes)
            if row is not None:
                rows.append(row)
    return rows


def random_workload(cfg: ModelConfig, batches: int = 3, batch_size: int = 32,
                    seed: int = 0) -> Workload:
    """Random token batches: forced decisions do not read the text."""
    generator = torch.Generator().manual_seed(seed)
    return Workload(f"random {batches}x{batch_size}x{cfg.n_seq}",
                    [torch.randint(cfg.vocab_size, (batch_size, cfg.n_seq), generator=generator)
                     for _ in range(batches)])
