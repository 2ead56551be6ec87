"""Learned per-position sparsity: a predictor decides where a block's per-position work runs.

In each block an importance predictor (a linear map of the residual stream, one logit per
position) decides whether position ``i`` *computes* the block's per-position work, the MoE
feed-forward and the potential projection ``v_i``, or *skips* it. A skipped position is filled
cheaply and causally:

* feed-forward output 0 (the residual stream passes through unchanged), and
* potential carried from the last computed position before it in the same sequence (0, the
  free Laplacian, if there is none).

The BK recurrence still visits every position (it is O(1) per position and its state must
advance), as does the readout of ``G``; the saving is the skipped per-position work, which runs
on the gathered computed positions only and is scattered back.

Training samples the mask with a Gumbel-sigmoid and a straight-through estimator (Jang et al.
2017; Bengio et al. 2013): the forward value is the hard 0/1 decision, the gradient that of
``sigmoid((logit + logistic noise) / tau)``. It reaches the predictor through the computed
positions, where ``f_i = m_i * MoE(h_i)`` and ``v_i = m_i * v_i + (1 - m_i) * carry_i``, and
through the sparsity loss ``weight * mean_layers (skip_rate - target)^2``. Evaluation is
deterministic: compute iff ``logit > 0`` (probability above 0.5).
"""

from __future__ import annotations

import torch
from torch import nn

from bk.model import BKBlock, DecodeState, LanguageModel, ModelConfig, ModelOutput, Work

GUMBEL_TEMPERATURE = 1.0
INITIAL_LOGIT = 3.0  # starts close to the dense model: P(compute) = sigmoid(3) = 0.95
RAMP_FRACTION = 0.5  # the target sparsity ramps from 0 over this fraction of fine-tuning


def compute_mask(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """1 where a position computes, 0 where it skips; straight-through Gumbel when training."""
    if not training:
        return (logits > 0).to(logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.rand_like(logits).clamp(tiny, 1 - tiny)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / GUMBEL_TEMPERATURE)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly ``hard`` forward, gradient of ``soft``


def carry_previous(values: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, N, C)`` at the last computed position strictly before each position,
    0 where there is none; ``computed`` ``(B, N)`` bool."""
    b, n, c = values.shape
    positions = torch.arange(n).expand(b, n)
    last = torch.where(computed, positions, -1).cummax(dim=1).values  # last computed <= i
    before = torch.cat([last.new_full((b, 1), -1), last[:, :-1]], dim=1)
    carried = values.gather(1, before.clamp(min=0)[..., None].expand(b, n, c))
    return torch.where((before >= 0)[..., None], carried, torch.zeros_like(carried))


def sparse_block(block: BKBlock, x: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run ``block`` on ``x`` ``(B, N, d)`` with per-position work only where ``mask`` is 1.

    ``mask`` ``(B, N)`` must be 0/1 in value (it may carry a straight-through gradient).
    Returns (new x, the MoE balance loss of the computed positions, number computed).
    """
    b, n, d = x.shape
    if mask.shape != (b, n):
        raise ValueError(f"mask must have shape {(b, n)} (batch, positions), got "
                         f"{tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask values must be exactly 0 (skip) or 1 (compute)")
    computed = mask.detach() == 1
    rows = computed.reshape(-1).nonzero().squeeze(1)
    out = x.reshape(b * n, d)  # skipped positions: feed-forward output 0
    v = out.new_zeros(b * n, block.potential.out_features)
    balance = x.new_zeros(())
    if rows.numel():
        f_rows, v_rows, balance = block.token_work(out.index_select(0, rows))
        if mask.requires_grad:  # straight-through: d f_i / d m_i = MoE(h_i)
            f_rows = f_rows * mask.reshape(-1).index_select(0, rows)[:, None]
        out = out.index_add(0, rows, f_rows)
        v = v.index_copy(0, rows, v_rows)
    v = v.view(b, n, -1)
    carry = carry_previous(v, computed)
    if mask.requires_grad:  # d v_i / d m_i = v_i - carry_i where computed, 0 where skipped
        m = (mask * computed)[..., None]
        v = m * v + (1 - m) * carry
    else:
        v = torch.where(computed[..., None], v, carry)
    g = block.resolvent(v)
    return out.view(b, n, d) + block.mix(g), balance, int(rows.numel())


class SparseLanguageModel(LanguageModel):
    """The dense model (same parameter names) plus an importance predictor per block."""

    def __init__(self, cfg: ModelConfig, target_sparsity: float = 0.5,
                 sparsity_weight: float = 1.0) -> None:
        super().__init__(cfg)
        if not 0 <= target_sparsity < 1:
            raise ValueError(f"target_sparsity is the fraction of skipped positions and must lie "
                             f"in [0, 1), got {target_sparsity}")
        if sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight}")
        self.target_sparsity = float(target_sparsity)
        self.current_target = float(target_sparsity)  # moved by ``schedule`` while fine-tuning
        self.sparsity_weight = float(sparsity_weight)
        self.importance = nn.ModuleList(nn.Linear(cfg.d_model, 1) for _ in range(cfg.n_layers))
        for predictor in self.importance:
            nn.init.zeros_(predictor.weight)
            nn.init.constant_(predictor.bias, INITIAL_LOGIT)

    def schedule(self, progress: float) -> None:
        """Ramp the target sparsity linearly from 0 to ``target_sparsity`` over the first
        ``RAMP_FRACTION`` of fine-tuning (``progress`` in [0, 1])."""
        if not 0 <= progress <= 1:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        self.current_target = self.target_sparsity * min(1.0, progress / RAMP_FRACTION)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        balance = penalty = x.new_zeros(())
        computed_layers = x.new_zeros(b, n)
        token_layers = 0
        for block, predictor in zip(self.blocks, self.importance, strict=True):
            mask = compute_mask(predictor(x).squeeze(-1), self.training)
            x, layer_balance, computed = sparse_block(block, x, mask)
            balance = balance + layer_balance
            penalty = penalty + (1 - mask.mean() - self.current_target) ** 2
            computed_layers = computed_layers + mask.detach()
            token_layers += computed
        layers = len(self.blocks)
        work = Work(token_layers=token_layers, expert_calls=token_layers,
                    positions=b * n * layers)
        stats = {"layers_per_token": computed_layers, "sparsity": 1 - computed_layers / layers}
        aux = {"balance": self.cfg.balance_weight * balance / layers,
               "sparsity": self.sparsity_weight * penalty / layers}
        return self.finish(x, targets, aux, work, stats)

    def init_state(self, batch_size: int) -> DecodeState:
        raise NotImplementedError("SparseLanguageModel has no incremental decoding (it would "
                                  "need the carried potential in the state); use forward()")

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        raise NotImplementedError("SparseLanguageModel has no incremental decoding (it would "
                                  "need the carried potential in the state); use forward()")
