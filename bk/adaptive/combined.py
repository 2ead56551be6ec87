"""The combined adaptive model: the multi-scale hourglass with learned per-position sparsity.

Of the techniques measured in bk-bench, the ones that cut per-token work along independent axes
are stacked here: the hourglass (bk.adaptive.multiscale) runs inner blocks on causally pooled,
shorter sequences, and in every block, at whatever resolution it runs, an importance predictor
(bk.adaptive.sparsity) decides which of that block's positions compute the per-position work.
How they combine is stated, not multiplied: sparsity skips a fraction of the positions that the
hourglass leaves at each level, and the executed work (``Work.token_layers``) counts exactly the
positions that ran; the speedup is measured, never the product of separate speedups.

ACT and early exit also cut per-token work, along the depth axis; a token-level depth decision
is undefined inside the hourglass's pooled levels, so they are alternatives to this stack, not
parts of it (the harness measures each on its own). Conditional MoE and the routing cache never
ran faster than the dense top-1 model (docs/routing.md), so they are not stacked.

With ``target_sparsity = 0`` and untrained predictors (every position computes) the model is the
multi-scale model exactly; with ``factor = 1`` as well, it is the dense model.
"""

from __future__ import annotations

import torch
from torch import nn

from bk.adaptive.multiscale import MultiScaleLanguageModel
from bk.adaptive.sparsity import INITIAL_LOGIT, RAMP_FRACTION, compute_mask, sparse_block
from bk.model import ModelConfig, ModelOutput


class CombinedLanguageModel(MultiScaleLanguageModel):
    """Dense block names (``blocks.{i}``), hourglass pooling parameters and one importance
    predictor per block (``importance.{i}``)."""

    def __init__(self, cfg: ModelConfig, *, factor: int = 2, levels: int = 2,
                 target_sparsity: float = 0.25, sparsity_weight: float = 1.0) -> None:
        super().__init__(cfg, factor=factor, levels=levels)
        if not 0 <= target_sparsity < 1:
            raise ValueError(f"target_sparsity must lie in [0, 1), got {target_sparsity}")
        if sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight}")
        self.target_sparsity = float(target_sparsity)
        self.current_target = float(target_sparsity)
        self.sparsity_weight = float(sparsity_weight)
        self.importance = nn.ModuleList(nn.Linear(cfg.d_model, 1) for _ in range(cfg.n_layers))
        for predictor in self.importance:
            nn.init.zeros_(predictor.weight)
            nn.init.constant_(predictor.bias, INITIAL_LOGIT)
        self._penalty: torch.Tensor | float = 0.0

    def schedule(self, progress: float) -> None:
        """Ramp the target sparsity from 0 over the first part of fine-tuning."""
        if not 0 <= progress <= 1:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        self.current_target = self.target_sparsity * min(1.0, progress / RAMP_FRACTION)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self._penalty = 0.0
        return super().forward(idx, targets)

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        mask = compute_mask(self.importance[index](x).squeeze(-1), self.training)
        if self.training:
            self._penalty = self._penalty + (1 - mask.mean() - self.current_target) ** 2
        return sparse_block(block, x, mask)

    def block_penalty(self) -> torch.Tensor | float:
        return self.sparsity_weight * self._penalty
