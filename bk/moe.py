"""Mixture-of-experts feed-forward with top-1 (switch) routing and sparse dispatch.

Each token goes to the expert with the highest router probability; the expert's output is
scaled by that probability, so the router is trained through its gate weights (the research
code used the argmax alone and its router never received a gradient). The load-balancing
loss is the switch-transformer auxiliary loss  E * sum_e f_e * P_e  (Fedus et al. 2021, eq. 4),
where f_e is the share of tokens sent to expert e and P_e the mean router probability of e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class Expert(nn.Module):
    """A two-layer GELU feed-forward network."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


@dataclass
class Routing:
    """A routing decision for a flat set of tokens: expert index and gate weight per token."""

    expert: torch.Tensor  # (T,) int64
    gate: torch.Tensor  # (T,) router probability of the chosen expert
    probs: torch.Tensor  # (T, E) full router distribution


class MoEFeedForward(nn.Module):
    """Top-1 mixture of experts over flattened tokens ``(T, d_model)``."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(d_model, n_experts)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))

    def route(self, x: torch.Tensor) -> Routing:
        probs = torch.softmax(self.router(x), dim=-1)
        gate, expert = probs.max(dim=-1)
        return Routing(expert=expert, gate=gate, probs=probs)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Run each expert only on the tokens routed to it and put the results back in order.

        Tokens are sorted by expert once, so each expert reads a contiguous slice (one sort and
        one count instead of a mask and a gather per expert).
        """
        order = torch.argsort(routing.expert, stable=True)
        counts = torch.bincount(routing.expert, minlength=self.n_experts).tolist()
        sorted_x = x.index_select(0, order)
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                outputs.append(expert(sorted_x[start:start + count]))
            start += count
        if not outputs:
            return torch.zeros_like(x)
        y = torch.cat(outputs) * routing.gate.index_select(0, order)[:, None]
        return torch.empty_like(y).index_copy(0, order, y)

    def balance_loss(self, routing: Routing) -> torch.Tensor:
        if routing.expert.numel() == 0:
            return routing.probs.new_zeros(())
        share = torch.bincount(routing.expert, minlength=self.n_experts).to(routing.probs.dtype)
        share = share / routing.expert.numel()
        return self.n_experts * (share * routing.probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (output, load-balancing loss); expert calls equal the number of tokens.

        The balance loss is a training term: in eval mode it is not computed and is 0.
        """
        routing = self.route(x)
        balance = self.balance_loss(routing) if self.training else x.new_zeros(())
        return self.dispatch(x, routing), balance
