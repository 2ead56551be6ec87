"""The combined adaptive model: every axis that cuts work, composed in one forward pass.

The composition rule. The hourglass (bk.adaptive.multiscale) fixes where each block runs: block
``i`` at level ``l_i``, on sequences pooled ``factor ** l_i`` times (the *sequence* axis). At that
resolution, each block is one of:

* *depth-routed* (bk.adaptive.depth, Mixture-of-Depths): the blocks ``depth_routed`` names run
  only on the first ``depth_capacity`` of the tokens their router selects in each window of
  the block's context (``n_seq // factor ** l_i`` positions); the others pass through the
  block untouched (the *depth* axis: a token skips whole blocks);
* *position-sparse* (bk.adaptive.sparsity): every other block runs its per-position work (the
  mixture of experts and the potential) only where its importance predictor says so, at most
  ``capacity`` of each context when a capacity is set; skipped positions still take part in
  the sequence mixing with a carried potential (the *positions* axis).

One forward pass, one :class:`~bk.model.Work` account: every block reports the rows it ran at
its resolution. Each axis switched off gives the model without it: ``depth_capacity = None``
routes no block (no routers exist), ``target_sparsity = None`` makes the remaining blocks dense
(no predictors run), ``factor = 1`` is the dense stack (pooling by 1 is the identity). With all
three off the model is the dense model; the speedup of each composition is measured, never the
product of separate speedups.

The width axis (conditional experts, bk.adaptive.conditional_moe) is not part of the stack: a
token with no expert is a position whose feed-forward is skipped, which the positions axis
already does without a second router, and top-k with k > 1 adds work.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from bk.adaptive.depth import DepthRouting, routed_layers
from bk.adaptive.multiscale import FACTOR, LEVELS, RISE, MultiScaleLanguageModel
from bk.adaptive.sparsity import CAPACITY, SPARSITY_WEIGHT, TARGET_SPARSITY, PositionSparsity
from bk.model import ModelConfig, ModelOutput
from bk.technique import Forcing, Knob, KnobError, TechniqueModel

DEPTH_CAPACITY = Knob("depth_capacity", float, 0.5,
                      "depth axis: fraction of each window's tokens that run a routed block "
                      "(none: no block is routed)", low=0.01, high=1.0, grid=(0.25, 0.5, 0.75),
                      search=(0.125, 1.0), optional=True)
DEPTH_ROUTED = Knob("depth_routed", str, "inner",
                    "routed blocks: 'alternate' (1, 3, 5, ...) or 'inner' (all but the first "
                    "and last)", choices=("alternate", "inner"), grid=("alternate", "inner"))
ROUTER_LOSS_WEIGHT = Knob("router_loss_weight", float, 0.1,
                          "weight of the routers' cross-entropy towards the top-capacity tokens",
                          low=0.0, grid=(0.1,), search=(1e-3, 1.0), log=True)


class CombinedLanguageModel(DepthRouting, PositionSparsity, MultiScaleLanguageModel):
    """Dense block names (``blocks.{i}``), hourglass pooling parameters, routers
    ``routers.{i}`` of the depth-routed blocks and importance predictors ``importance.{i}``.

    Forced (the ceiling), the pooling stays as it is, routed blocks run evenly strided tokens
    (``"uniform"``) or random ones (``"per_token"``) at capacity ``keep``, position-sparse
    blocks the fraction ``keep`` of their positions; no router or predictor runs.
    """

    KNOBS: ClassVar[tuple[Knob, ...]] = (
        replace(FACTOR, default=2, grid=(2, 4)),
        replace(LEVELS, default=1, grid=(1, 2)), RISE,
        DEPTH_CAPACITY, DEPTH_ROUTED, ROUTER_LOSS_WEIGHT,
        replace(TARGET_SPARSITY, default=None, grid=(0.1, 0.25, 0.5), search=(0.0, 0.9),
                optional=True, help="positions axis: fraction of each position-sparse block's "
                                    "positions whose per-position work is skipped (none: the "
                                    "blocks that are not routed run dense)"),
        replace(SPARSITY_WEIGHT, grid=(1.0,)),
        CAPACITY)
    DEPTH_CAPACITY: ClassVar[str] = "depth_capacity"
    AXES: ClassVar[dict[str, dict[str, int | None]]] = {
        "sequence": {"factor": 1}, "depth": {"depth_capacity": None},
        "positions": {"target_sparsity": None}}
    DECODES = False
    NO_DECODE_REASON = ("it would need, at once, the hourglass's partial groups, the routed "
                        "blocks' counts and the sparse blocks' carried potentials")
    init_state = TechniqueModel.init_state  # both refuse (the hourglass alone could decode)
    step = TechniqueModel.step

    def __init__(self, cfg: ModelConfig, *, factor: int = 2, levels: int = 1,
                 rise: str = "last", depth_capacity: float | None = 0.5,
                 depth_routed: str = "inner", router_loss_weight: float = 0.1,
                 target_sparsity: float | None = None,
                 sparsity_weight: float = 1.0, capacity: float | None = None) -> None:
        super().__init__(cfg, factor=factor, levels=levels, rise=rise)
        self.depth_capacity = self.knob("depth_capacity").parse(depth_capacity)
        self.depth_routed = self.knob("depth_routed").parse(depth_routed)
        self.router_loss_weight = self.knob("router_loss_weight").parse(router_loss_weight)
        layers = [] if self.depth_capacity is None else routed_layers(self.depth_routed,
                                                                      cfg.n_layers)
        if self.depth_capacity is not None and not layers:
            raise KnobError(f"knob depth_routed: {self.depth_routed!r} routes no block of a "
                            f"{cfg.n_layers}-block model")
        self.init_routing(layers)
        self.init_sparsity(0.0 if target_sparsity is None else target_sparsity,
                           sparsity_weight, capacity)
        self.target_sparsity = self.knob("target_sparsity").parse(target_sparsity)
        if self.target_sparsity is None:
            self.importance = nn.ModuleList()  # the positions axis is off: no predictors

    def schedule(self, progress: float) -> None:
        if self.target_sparsity is None:
            TechniqueModel.schedule(self, progress)
        else:
            super().schedule(progress)

    def forced(self, forcing: Forcing) -> CombinedLanguageModel | None:
        if not isinstance(forcing, Forcing):
            raise TypeError(f"forcing must be a bk.technique.Forcing, got "
                            f"{type(forcing).__name__}")
        if not self.routers and self.target_sparsity is None:
            return None  # no decisions: the hourglass alone
        model = copy.copy(self)
        model.forcing = forcing
        return model

    def block_context(self, index: int) -> int:
        return max(1, self.cfg.n_seq // self.factor ** self.block_level[index])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        generator = self.forcing.generator() if self.forcing is not None else None

        def run(index: int, block: nn.Module, x: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
            if str(index) in self.routers:
                x, balance, router_loss, subset = self.routed_block(
                    index, block, x, self.block_context(index), generator)
                terms = {}
                if self.training:
                    terms["balance"] = self.cfg.balance_weight * balance
                    if router_loss is not None:
                        terms["router"] = self.router_loss_weight * router_loss
                return x, terms, subset.size
            if self.target_sparsity is not None:
                x, terms, subset = self.sparse_block(index, block, x, generator)
                return x, terms, subset.size
            return self.run_block(index, block, x)

        return self.hourglass(idx, targets, run)
