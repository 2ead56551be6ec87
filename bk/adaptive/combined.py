"""The combined adaptive model: the multi-scale hourglass with learned per-position sparsity.

Of the techniques measured in bk-bench, the ones that cut per-token work along independent axes
are stacked here: the hourglass (bk.adaptive.multiscale) runs inner blocks on causally pooled,
shorter sequences, and in every block, at whatever resolution it runs, an importance predictor
(bk.adaptive.sparsity) decides which of that block's positions compute the per-position work.
How they combine is stated, not multiplied: sparsity skips a fraction of the positions that the
hourglass leaves at each level, and the executed work (``Work.token_layers``) counts exactly the
rows that ran; the speedup is measured, never the product of separate speedups.

ACT and early exit also cut per-token work, along the depth axis; a token-level depth decision
is undefined inside the hourglass's pooled levels, so they are alternatives to this stack, not
parts of it (the harness measures each on its own). Conditional MoE and the routing cache never
ran faster than the dense top-1 model (docs/routing.md), so they are not stacked.

With ``target_sparsity = 0`` and untrained predictors (every position computes) the model is the
multi-scale model (to float rounding); with ``factor = 1`` as well, it is the dense model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from bk.adaptive.multiscale import FACTOR, LEVELS, MultiScaleLanguageModel
from bk.adaptive.sparsity import CAPACITY, SPARSITY_WEIGHT, TARGET_SPARSITY, PositionSparsity
from bk.model import ModelConfig, ModelOutput
from bk.technique import TechniqueModel


class CombinedLanguageModel(PositionSparsity, MultiScaleLanguageModel):
    """Dense block names (``blocks.{i}``), hourglass pooling parameters and one importance
    predictor per block (``importance.{i}``).

    The skippable unit is a block's per-position work at the block's resolution; forced, the
    pooling stays as it is and each block runs the fraction ``keep`` of its positions, evenly
    strided (``"uniform"``) or independently at random (``"per_token"``), with no predictor.
    A capacity caps block ``i`` at ``ceil(capacity * (n_seq // factor ** level))`` positions.
    """

    KNOBS = (FACTOR, LEVELS,
             replace(TARGET_SPARSITY, default=0.1, grid=(0.0, 0.1, 0.25), search=(0.0, 0.9),
                     help="fraction of each block's positions whose per-position work is "
                          "skipped"),
             replace(SPARSITY_WEIGHT, grid=(1.0,)),
             CAPACITY)
    DECODES = False
    NO_DECODE_REASON = ("it would need the hourglass's cache of partial groups and, in every "
                        "block, the carried potential and capacity count of the sparsity")
    init_state = TechniqueModel.init_state  # both refuse: the hourglass's step has no sparsity
    step = TechniqueModel.step

    def __init__(self, cfg: ModelConfig, *, factor: int = 2, levels: int = 2,
                 target_sparsity: float = 0.1, sparsity_weight: float = 1.0,
                 capacity: float | None = None) -> None:
        super().__init__(cfg, factor=factor, levels=levels)
        self.init_sparsity(target_sparsity, sparsity_weight, capacity)

    def block_context(self, index: int) -> int:
        return self.cfg.n_seq // self.factor ** self.block_level[index]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        generator = self.forcing.generator() if self.forcing is not None else None

        def run_sparse_block(index: int, block: nn.Module, x: torch.Tensor
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
            x, terms, subset = self.sparse_block(index, block, x, generator)
            return x, terms, subset.size

        return self.hourglass(idx, targets, run_sparse_block)
