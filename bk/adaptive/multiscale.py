"""Multi-scale ResNet-BK: inner blocks run on causally pooled, shorter sequences.

The stack is an hourglass over the dense model's blocks (causal Hourglass, Nawrot et al. 2022,
"Hierarchical Transformers Are More Efficient Language Models"; Funnel, Dai et al. 2020).
Block ``i`` runs at level ``l_i``, i.e. on ``N_l = floor(N / k^l)`` positions, with
``l_i = min(i, levels)`` for every block but the last, which runs at full resolution. The
default (4 blocks, ``levels=2``) is ``N -> N/2 -> N/4 -> (N/2 merge) -> N``:
block 0 at N, block 1 at N/2, block 2 at N/4, block 3 at N after up-sampling.

Down-sampling (level l -> l+1): pooled position ``j`` is a learned convex combination of the k
positions ``jk .. jk+k-1`` of its group, ``y_j = sum_r softmax(w)_r x_{jk+r}`` (per channel);
equal weights give mean pooling. A trailing incomplete group is dropped: it could only be used by
positions beyond the sequence (below), so any N works and nothing needs padding.

Up-sampling (level l+1 -> l): group ``j`` is complete once position ``jk+k-1`` has been read, so
position ``t`` receives the group ``floor((t+1)/k) - 1`` (none for ``t < k-1``): the causal
shift of the Hourglass decoder. What it receives is the *update* the coarse blocks made,
``gain_r * (y'_j - y_j)`` with a learned gain per offset ``r = t-(k-1) mod k`` (initially 1),
added to the fine stream it was pooled from; that full-resolution residual keeps each
position's own information. With ``k = 1`` pooling and up-sampling are the identity and the
model is the dense model (up to float rounding of ``x + (y - x)``).

Causality: a coarse block is causal over groups, group ``j`` depends on tokens ``<= jk+k-1``,
and it is read only at positions ``>= jk+k-1``; by induction over levels no position sees a
later token.
"""

from __future__ import annotations

import torch
from torch import nn

from bk.model import DecodeState, LanguageModel, ModelConfig, ModelOutput, Work


def block_levels(n_layers: int, levels: int) -> tuple[int, ...]:
    """Resolution level of each block: ``min(i, levels)``, the last block at full resolution."""
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    if levels > 0 and levels > n_layers - 2:
        raise ValueError(f"levels={levels} needs at least levels + 2 = {levels + 2} blocks (one "
                         f"full-resolution block on each side); the model has {n_layers}")
    return tuple(min(i, levels) for i in range(n_layers - 1)) + (0,)


def pool(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Causal pooling of ``x`` ``(B, N, d)`` by groups of ``k = weights.shape[0]``.

    ``weights`` ``(k, d)`` are logits, softmax-normalised over the group; returns
    ``(B, N // k, d)``; group ``j`` summarises positions ``jk .. jk+k-1``.
    """
    b, n, d = x.shape
    k = weights.shape[0]
    groups = n // k
    grouped = x[:, :groups * k].reshape(b, groups, k, d)
    return (grouped * torch.softmax(weights, dim=0)).sum(dim=2)


def unpool(delta: torch.Tensor, gains: torch.Tensor, length: int) -> torch.Tensor:
    """Causal up-sampling of ``delta`` ``(B, G, d)`` to ``(B, length, d)``.

    Position ``t`` gets ``gains[r] * delta[floor((t+1)/k) - 1]`` with ``r = (t-(k-1)) mod k``,
    and zero for ``t < k-1``: a group is read only after its last position.
    """
    b, groups, d = delta.shape
    k = gains.shape[0]
    if not groups * k <= length < (groups + 1) * k:
        raise ValueError(f"{groups} groups of {k} do not tile a sequence of length {length}")
    spread = (delta[:, :, None, :] * gains).reshape(b, groups * k, d)
    return torch.cat([spread.new_zeros(b, k - 1, d), spread], dim=1)[:, :length]


class MultiScaleLanguageModel(LanguageModel):
    """The dense model's blocks (same names, ``blocks.{i}``) on an hourglass of resolutions."""

    def __init__(self, cfg: ModelConfig, factor: int = 2, levels: int = 2) -> None:
        super().__init__(cfg)
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.factor = factor
        self.levels = block_levels(cfg.n_layers, levels)
        depth = max(self.levels)
        # Zero logits: mean pooling; unit gains: the coarse update passed on unchanged.
        self.pool_weights = nn.ParameterList(
            nn.Parameter(torch.zeros(factor, cfg.d_model)) for _ in range(depth))
        self.unpool_gains = nn.ParameterList(
            nn.Parameter(torch.ones(factor, cfg.d_model)) for _ in range(depth))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        balance = x.new_zeros(())
        finer: list[tuple[torch.Tensor, torch.Tensor]] = []  # (fine stream, coarse at pooling)
        token_layers = positions = 0
        for i, (block, level) in enumerate(zip(self.blocks, self.levels, strict=True)):
            x = self._move_to(level, x, finer)
            if x.shape[1] > 0:  # a level shorter than one group has no positions to run
                x, layer_balance, computed = self.run_block(i, block, x)
                balance = balance + layer_balance
                token_layers += computed
                positions += b * x.shape[1]
        x = self._move_to(0, x, finer)
        layers = len(self.blocks)
        work = Work(token_layers=token_layers, expert_calls=token_layers, positions=positions)
        stats = {"layers_per_token": x.new_full((b, n), token_layers / (b * n))}
        aux = {"balance": self.cfg.balance_weight * balance / layers,
               "blocks": self.block_penalty() / layers}
        return self.finish(x, targets, aux, work, stats)

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Block ``index`` on ``x`` at its resolution: (new x, balance loss, positions whose
        per-token work ran). A subclass may run blocks differently (see bk.adaptive.combined)."""
        x, balance = block(x)
        return x, balance, x.shape[0] * x.shape[1]

    def block_penalty(self) -> torch.Tensor | float:
        """An auxiliary training term gathered by ``run_block``; none here."""
        return 0.0

    def _move_to(self, level: int, x: torch.Tensor,
                 finer: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Pool down or merge up from the current level (``len(finer)``) to ``level``."""
        while len(finer) < level:
            coarse = pool(x, self.pool_weights[len(finer)])
            finer.append((x, coarse))
            x = coarse
        while len(finer) > level:
            fine, pooled = finer.pop()
            x = fine + unpool(x - pooled, self.unpool_gains[len(finer)], fine.shape[1])
        return x

    def init_state(self, batch_size: int) -> DecodeState:
        raise NotImplementedError("MultiScaleLanguageModel has no incremental decoding (it would "
                                  "need a per-level cache of partial groups); use forward()")

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        raise NotImplementedError("MultiScaleLanguageModel has no incremental decoding (it would "
                                  "need a per-level cache of partial groups); use forward()")
