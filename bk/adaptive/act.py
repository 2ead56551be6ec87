"""Adaptive Computation Time over the layers of ResNet-BK (Graves 2016, arXiv:1603.08983).

After layer n every still-running token emits a halting probability p_n = sigmoid(w . x_n + b)
from its state x_n. With threshold 1 - eps (Graves' eq. 7, 8, 10) a token halts at

    N = min(L, first n with p_1 + ... + p_n >= threshold),   R = 1 - (p_1 + ... + p_{N-1}),

its halting weights are p_n for n < N, R at n = N and 0 after (they sum to 1, also for tokens
that reach the cap L), its output is the mean-field state sum_n w_n x_n (eq. 9) and its ponder
cost is N + R (eq. 11). The objective is cross-entropy + act_lambda * mean ponder cost (+ the MoE
balance term in training, averaged over the layers that ran). N is piecewise constant, so the
gradient of the ponder cost reaches p only through R (-1 for each p_n with n < N, eq. 13).

The last layer needs no halting unit: every token still running there halts (N <= L), so
there are L - 1 units.

What a halted token skips, and the rule for the BK recurrence (training and inference compute
the same function, in ``forward`` and ``step`` alike): each layer runs through
:func:`bk.skip.run_block` on the still-running tokens with ``fill="zero"``, ``readout="ran"``:

* Skipped at every later layer: its LayerNorm, router and expert, potential and readout
  projections, halting unit and the residual update.
* Not skipped: the BK recurrence of a layer visits every position of the sequence as long as
  any token of the batch still runs that layer. A halted position's potential is held at 0 in
  every later layer, so the recurrence passes through H0 there (diagonal -2, couplings 1).
  A layer in which no token of the batch runs is skipped entirely, recurrence included (in
  ``step`` it still advances its recurrence, with potential 0, for the positions after).
* A halted token's state is frozen: nothing after its halting layer changes its output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from bk.adaptive.depth import forced_copy, forced_depths
from bk.model import DecodeState, ModelConfig, ModelOutput, Work
from bk.skip import Subset, run_block, step_block
from bk.technique import Forcing, Knob, KnobError, TechniqueModel

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
    """Halting bookkeeping of flat tokens ``(T,)`` while they run the layers."""

    running: torch.Tensor  # (T,) bool, not halted yet
    cumulative: torch.Tensor  # (T,) p_1 + ... + p_{n-1}
    mean_field: torch.Tensor  # (T, d) sum_{k<n} w_k x_k; the output once halted
    layers: torch.Tensor  # (T,) layers run (N once halted)
    ponder_cost: torch.Tensor  # (T,) N + R once halted, 0 before

    @classmethod
    def start(cls, x: torch.Tensor) -> Pondering:
        t = x.shape[0]
        return cls(torch.ones(t, dtype=torch.bool, device=x.device), x.new_zeros(t),
                   torch.zeros_like(x), x.new_zeros(t), x.new_zeros(t))


class ACTLanguageModel(TechniqueModel):
    """ResNet-BK with per-token ACT halting over layers; dense parameters keep their names.

    Forcing (the ceiling, :meth:`forced`): the skippable unit is a token-layer. The forced model
    runs no halting unit; token ``t`` runs ``D_t`` layers (:func:`bk.adaptive.depth.
    forced_depths`: ``"uniform"``, every token the same depth ``keep * L`` rounded to whole
    layers; ``"per_token"``, a random depth per token with mean ``keep * L``), as if its
    halting probabilities were 0 before ``D_t``: its halting weight is 1 on its state after
    layer ``D_t``, which is its output, and its ponder cost ``D_t + 1``.
    """

    KNOBS: ClassVar[tuple[Knob, ...]] = (
        Knob("act_threshold", float, 0.99, "halting threshold 1 - epsilon on the cumulative "
             "halting probability, in (0, 1]", low=0.0, high=1.0,
             grid=(0.5, 0.8, 0.9, 0.95, 0.99), search=(0.5, 0.999)),
        Knob("act_lambda", float, 0.07, "weight of the mean ponder cost N + R in the loss",
             low=0.0, grid=(0.001, 0.005, 0.01, 0.05, 0.1), search=(1e-4, 0.2), log=True),
    )

    def __init__(self, cfg: ModelConfig, *, act_threshold: float = 0.99,
                 act_lambda: float = 0.07) -> None:
        super().__init__(cfg)
        knobs = self.resolve_knobs({"act_threshold": act_threshold, "act_lambda": act_lambda})
        if knobs["act_threshold"] == 0:
            raise KnobError("knob act_threshold: expected a number in (0, 1] (1 - epsilon), "
                            "got 0.0")
        self.act_threshold = knobs["act_threshold"]
        self.act_lambda = knobs["act_lambda"]
        self.forcing: Forcing | None = None
        self.halting_units = nn.ModuleList(nn.Linear(cfg.d_model, 1)
                                           for _ in range(cfg.n_layers - 1))
        bias = math.log(INITIAL_HALTING_PROBABILITY / (1 - INITIAL_HALTING_PROBABILITY))
        for unit in self.halting_units:
            nn.init.zeros_(unit.weight)
            nn.init.constant_(unit.bias, bias)

    def forced(self, forcing: Forcing) -> ACTLanguageModel:
        return forced_copy(self, forcing)

    def halt(self, layer: int, x: torch.Tensor, subset: Subset, state: Pondering,
             depths: torch.Tensor | None) -> Pondering:
        """Graves' rule after ``layer`` (0-based) for the tokens of ``subset`` of flat ``x``."""
        xr = subset.gather(x)
        cumulative = subset.gather(state.cumulative)
        remainder = 1 - cumulative
        if depths is not None:  # forced: p = 0 before the given depth, halt there
            halts = subset.gather(depths) == layer + 1
            weight = torch.where(halts, remainder, 0.0)
        elif layer == len(self.blocks) - 1:  # the cap
            halts = torch.ones_like(remainder, dtype=torch.bool)
            weight = remainder
        else:
            p = torch.sigmoid(self.halting_units[layer](xr)).squeeze(-1)
            halts = cumulative + p >= self.act_threshold
            weight = torch.where(halts, remainder, p)
            state = replace(state, cumulative=subset.add(state.cumulative, p))
        return replace(
            state,
            running=subset.scatter(state.running, ~halts),
            mean_field=subset.add(state.mean_field, weight[:, None] * xr),
            layers=subset.add(state.layers, torch.ones_like(remainder)),
            ponder_cost=subset.add(state.ponder_cost,
                                   torch.where(halts, layer + 1 + remainder, 0.0)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        state = Pondering.start(x.view(b * n, -1))
        depths = (None if self.forcing is None
                  else forced_depths(self.forcing, self.cfg.n_layers, b * n).to(x.device))
        balance = x.new_zeros(())
        work = Work()
        ran_layers = 0
        for layer, block in enumerate(self.blocks):
            subset = Subset.where(state.running)
            if subset.size == 0:
                break
            x, layer_balance = run_block(block, x, subset, fill="zero", readout="ran")
            balance = balance + layer_balance
            work = work + Work(token_layers=subset.size, expert_calls=subset.size,
                               positions=b * n)
            ran_layers += 1
            state = self.halt(layer, x.view(b * n, -1), subset, state, depths)
        stats = {"layers_per_token": state.layers.view(b, n),
                 "ponder_cost": state.ponder_cost.view(b, n).detach()}
        aux = {"ponder": self.act_lambda * state.ponder_cost.mean()}
        if self.training:
            aux["balance"] = self.cfg.balance_weight * balance / ran_layers
        return self.finish(state.mean_field.view(b, n, -1), targets, aux, work, stats)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        """Logits ``(B, V)`` for the next token after ``tokens`` ``(B,)``, and the new state:
        ``forward``'s function one position at a time (a layer that no token runs still
        advances its recurrence, with potential 0)."""
        if not self.DECODES:
            return super().step(tokens, state)  # raises, saying why
        self.check_tokens(tokens[:, None])
        x = self.embed(tokens)
        pondering = Pondering.start(x)
        new_g = []
        for layer, (block, g_prev) in enumerate(zip(self.blocks, state.g, strict=True)):
            subset = Subset.where(pondering.running)
            x, g = step_block(block, x, subset, g_prev)
            new_g.append(g)
            pondering = self.halt(layer, x, subset, pondering, None)
        logits = self.head(self.norm(pondering.mean_field))
        return logits, DecodeState(tuple(new_g), state.position + 1)
