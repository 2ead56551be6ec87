"""Adaptive Computation Time over the layers of ResNet-BK (Graves 2016, arXiv:1603.08983).

After layer n every still-running token emits a halting probability p_n = sigmoid(w . x_n + b)
from its state x_n. With threshold 1 - eps (Graves' eq. 7, 8, 10) a token halts at

    N = min(L, first n with p_1 + ... + p_n >= threshold),   R = 1 - (p_1 + ... + p_{N-1}),

its halting weights are p_n for n < N, R at n = N and 0 after (they sum to 1, also for tokens
that reach the cap L), its output is the mean-field state sum_n w_n x_n (eq. 9) and its ponder
cost is N + R (eq. 11). The objective is cross-entropy + lambda * mean ponder cost (+ the MoE
balance term, averaged over the layers that ran). N is piecewise constant, so the gradient of
the ponder cost reaches p only through R (-1 for each p_n with n < N, eq. 13).

The last layer needs no halting unit: every token still running there halts (N <= L), so
there are L - 1 units.

What a halted token skips, and the rule for the BK recurrence (training and inference compute
the same function, in ``forward`` and ``step`` alike):

* Skipped at every later layer: its LayerNorm, router and expert, potential and readout
  projections, halting unit and the residual update. Running tokens are gathered into a
  compact ``(T_running, d)`` tensor, computed, and only their outputs scattered back.
* Not skipped: the BK recurrence of a layer visits every position of the sequence as long as
  any token of the batch still runs that layer. A halted position's potential is held at 0 in
  every later layer, so the recurrence passes through H0 there (diagonal -2, couplings 1).
  A layer in which no token of the batch runs is skipped entirely, recurrence included.
* A halted token's state is frozen: nothing after its halting layer changes its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bk.core import causal_step
from bk.model import (
    H0_COUPLING,
    H0_DIAGONAL,
    BKBlock,
    DecodeState,
    LanguageModel,
    ModelConfig,
    ModelOutput,
    Work,
)

# Every token starts with p = 0.55 after each layer, so p_1 + p_2 >= 0.99: at the default
# threshold every token halts after two layers when fine-tuning begins.
INITIAL_HALTING_PROBABILITY = 0.55


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            0 < threshold <= 1):
        raise ValueError(f"ACT threshold must be a number in (0, 1] (threshold = 1 - epsilon), "
                         f"got {threshold!r}")


def halting(p: torch.Tensor, threshold: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graves' halting weights for halting probabilities ``p`` of shape ``(L, *batch)``.

    Returns ``(weights (L, *batch), n_steps (*batch) int64, remainder (*batch))``; the ponder
    cost is ``n_steps + remainder``. Differentiable in ``p`` (``n_steps`` is piecewise
    constant; the gradient flows through the remainder and the weights before ``n_steps``).
    """
    check_threshold(threshold)
    if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
        raise ValueError(f"halting probabilities must be a real floating-point tensor, got "
                         f"{getattr(p, 'dtype', type(p).__name__)}")
    if p.dim() == 0 or p.shape[0] == 0:
        raise ValueError(f"halting probabilities must have shape (L>=1, *batch), got "
                         f"{tuple(p.shape)}")
    if bool(torch.isnan(p).any()):
        raise ValueError("halting probabilities contain NaN")
    if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"halting probabilities must lie in [0, 1], got values in "
                         f"[{p.min().item()}, {p.max().item()}]")
    steps = p.shape[0]
    reached = torch.cumsum(p, dim=0) >= threshold
    reached[-1] = True  # the cap: every token halts at step L at the latest
    n_steps = reached.int().argmax(dim=0) + 1  # argmax returns the first maximum
    step = torch.arange(1, steps + 1).view(steps, *([1] * (p.dim() - 1)))
    before = (step < n_steps).to(p.dtype)
    remainder = 1 - (p * before).sum(dim=0)
    weights = p * before + remainder * (step == n_steps).to(p.dtype)
    return weights, n_steps.to(torch.int64), remainder


@dataclass
class Pondering:
    """Result of running the layers with halting on flat tokens ``(T, d)``."""

    output: torch.Tensor  # (T, d) mean-field output sum_n w_n x_n
    layers: torch.Tensor  # (T,) int64, layers executed per token (N)
    ponder_cost: torch.Tensor  # (T,) N + R
    balance: torch.Tensor  # MoE balance loss summed over the executed layers
    depth: int  # layers in which at least one token ran
    work: Work


Recurrence = Callable[[int, BKBlock, torch.Tensor], torch.Tensor]


class ACTLanguageModel(LanguageModel):
    """ResNet-BK with per-token ACT halting over layers; dense parameters keep their names."""

    def __init__(self, cfg: ModelConfig, threshold: float = 0.99,
                 ponder_weight: float = 0.01) -> None:
        super().__init__(cfg)
        check_threshold(threshold)
        if not math.isfinite(ponder_weight) or ponder_weight < 0:
            raise ValueError(f"ACT ponder weight (lambda) must be a finite number >= 0, got "
                             f"{ponder_weight!r}")
        self.threshold = float(threshold)
        self.ponder_weight = float(ponder_weight)
        self.halting_units = nn.ModuleList(nn.Linear(cfg.d_model, 1)
                                           for _ in range(cfg.n_layers - 1))
        bias = math.log(INITIAL_HALTING_PROBABILITY / (1 - INITIAL_HALTING_PROBABILITY))
        for unit in self.halting_units:
            nn.init.zeros_(unit.weight)
            nn.init.constant_(unit.bias, bias)

    def ponder(self, x: torch.Tensor, recurrence: Recurrence) -> Pondering:
        """Run the layers on flat tokens ``x`` ``(T, d)``, each token until it halts.

        ``recurrence(layer, block, v)`` maps the potentials ``v`` ``(T, C)`` of all tokens
        (0 where halted) to their resolvent values ``(T, C)``.
        """
        total = x.shape[0]
        running = torch.arange(total)  # flat indices of the running tokens
        cum = x.new_zeros(total)  # p_1 + ... + p_{n-1} of each running token
        mean_field = torch.zeros_like(x)  # sum_{k<n} w_k x_k of each running token
        # Tokens that halted, one tensor per layer: flat index, output, layers run, ponder cost.
        halted_index: list[torch.Tensor] = []
        halted_output: list[torch.Tensor] = []
        halted_layers: list[torch.Tensor] = []
        halted_ponder: list[torch.Tensor] = []
        balance = x.new_zeros(())
        work = Work()
        last = len(self.blocks) - 1
        depth = 0
        for n, block in enumerate(self.blocks):
            if running.numel() == 0:
                break
            f, v_running, layer_balance = block.token_work(x)
            v = v_running.new_zeros(total, v_running.shape[1]).index_copy(0, running, v_running)
            g = recurrence(n, block, v).index_select(0, running)
            x = x + f + block.mix(g)
            depth += 1
            work = work + Work(token_layers=running.numel(), expert_calls=running.numel(),
                               positions=total)
            balance = balance + layer_balance
            remainder = 1 - cum
            if n == last:
                halts = torch.ones_like(running, dtype=torch.bool)
                weight = remainder
            else:
                p = torch.sigmoid(self.halting_units[n](x)).squeeze(-1)
                halts = cum + p >= self.threshold
                weight = torch.where(halts, remainder, p)
                cum = cum + p
            mean_field = mean_field + weight[:, None] * x
            # Gathers only (index_select); scattering back happens once, after the last layer.
            stop, go = halts.nonzero().squeeze(1), (~halts).nonzero().squeeze(1)
            halted_index.append(running.index_select(0, stop))
            halted_output.append(mean_field.index_select(0, stop))
            halted_layers.append(torch.full_like(stop, n + 1))
            halted_ponder.append(n + 1 + remainder.index_select(0, stop))
            x, running, cum, mean_field = (t.index_select(0, go)
                                           for t in (x, running, cum, mean_field))
        index = torch.cat(halted_index)
        row_of_token = torch.empty_like(index)
        row_of_token[index] = torch.arange(total)
        output, layers, ponder_cost = (torch.cat(t).index_select(0, row_of_token) for t in
                                       (halted_output, halted_layers, halted_ponder))
        return Pondering(output, layers, ponder_cost, balance, depth, work)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape

        def recurrence(layer: int, block: BKBlock, v: torch.Tensor) -> torch.Tensor:
            return block.resolvent(v.view(b, n, -1)).reshape(b * n, -1)

        run = self.ponder(self.embed(idx).reshape(b * n, -1), recurrence)
        stats = {"layers_per_token": run.layers.view(b, n).to(run.output.dtype),
                 "ponder_cost": run.ponder_cost.view(b, n).detach()}
        aux = {"balance": self.cfg.balance_weight * run.balance / run.depth,
               "ponder": self.ponder_weight * run.ponder_cost.mean()}
        return self.finish(run.output.view(b, n, -1), targets, aux, run.work, stats)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        """Logits ``(B, V)`` for the next token after ``tokens`` ``(B,)``, and the new state.

        Computes the same function as ``forward`` one position at a time: layers in which every
        token of the batch has halted still advance their recurrence, with potential 0.
        """
        self.check_tokens(tokens[:, None])
        new_g = list(state.g)

        def recurrence(layer: int, block: BKBlock, v: torch.Tensor) -> torch.Tensor:
            new_g[layer] = causal_step(H0_DIAGONAL + v, H0_COUPLING * H0_COUPLING,
                                       block.shift(), state.g[layer])
            return new_g[layer]

        x = self.embed(tokens)
        run = self.ponder(x, recurrence)
        for layer in range(run.depth, len(self.blocks)):
            recurrence(layer, self.blocks[layer], x.new_zeros(x.shape[0], self.cfg.bk_channels))
        return self.head(self.norm(run.output)), DecodeState(tuple(new_g), state.position + 1)
