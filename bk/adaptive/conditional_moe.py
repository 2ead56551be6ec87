"""Conditional mixture of experts: each token chooses how many experts it uses.

Per token a difficulty predictor picks ``k`` in ``[k_min, k_max]``; the token goes to the
``k`` experts with the highest router probabilities, with gate weights renormalised over them
(``k_min = 0`` lets a token skip the feed-forward entirely: its MoE output is 0):

    y = sum_{j < k} p_(j) E_(j)(x) / sum_{j < k} p_(j)      (p_(j): j-th largest probability)

The research code chose ``k`` with ``round()``, so its predictor never received a gradient.
Here ``k`` is a one-hot choice over the ``k_max - k_min + 1`` values, drawn in training with
the straight-through Gumbel-softmax (Jang et al. 2017, eq. 1; Bengio et al. 2013): the forward
pass uses the hard one-hot, the backward pass the soft relaxation. Slot ``j`` of the top-k is
active when ``k > j``, so its mask is a sum of one-hot entries and carries the relaxation's
gradient into the renormalised gates. Only active slots run their expert (sparse dispatch), so
the gradient through a mask is the part that flows through the renormalisation of the executed
slots; the unexecuted expert's own output term is absent (it was never computed). The cost
penalty ``k_cost * E_soft[k]`` also reaches the predictor. In eval mode ``k`` is the argmax.

The load-balancing loss generalises the switch loss (Fedus et al. 2021, eq. 4) to top-k:
``E * sum_e f_e P_e`` with ``f_e`` the share of expert assignments that went to expert ``e``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bk.model import LanguageModel, ModelConfig, ModelOutput, Work
from bk.moe import Expert

INITIAL_PREFERENCE = 2.0  # difficulty logit of k = 1 at initialisation (the others are 0)


@dataclass
class ConditionalRouting:
    """Routing for flat tokens ``(T, d)``: the top-``k_max`` experts and which slots are active."""

    experts: torch.Tensor  # (T, k_max) int64, descending router probability
    gates: torch.Tensor  # (T, k_max) renormalised gate weights, 0 on inactive slots
    active: torch.Tensor  # (T, k_max) bool, slot j active iff j < k
    k: torch.Tensor  # (T,) int64 experts used per token
    expected_k: torch.Tensor  # (T,) differentiable E[k] under the predictor's distribution
    probs: torch.Tensor  # (T, E) router distribution

    def load(self, n_experts: int) -> torch.Tensor:
        """Tokens each expert receives, ``(E,)`` int64; sums to ``k.sum()``."""
        return torch.bincount(self.experts[self.active], minlength=n_experts)


class ConditionalMoE(nn.Module):
    """Top-k mixture of experts with a learned per-token ``k``, over flat tokens ``(T, d)``.

    Keeps the dense model's parameter names (``router``, ``experts.{e}``); the difficulty
    predictor is new (``difficulty``).
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, *, k_min: int = 1,
                 k_max: int = 2, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0 <= k_min <= k_max <= n_experts or k_max < 1:
            raise ValueError(f"need 0 <= k_min <= k_max <= n_experts ({n_experts}) and "
                             f"k_max >= 1; got k_min={k_min}, k_max={k_max}")
        if not temperature > 0:
            raise ValueError(f"Gumbel-softmax temperature must be > 0, got {temperature}")
        self.n_experts, self.k_min, self.k_max = n_experts, k_min, k_max
        self.temperature = temperature
        self.router = nn.Linear(d_model, n_experts)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        self.difficulty = nn.Linear(d_model, k_max - k_min + 1)
        nn.init.zeros_(self.difficulty.weight)
        nn.init.zeros_(self.difficulty.bias)
        with torch.no_grad():  # start near the dense model: k = 1 is the most probable choice
            self.difficulty.bias[max(0, 1 - k_min)] = INITIAL_PREFERENCE

    def choose_k(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(straight-through one-hot over k values ``(T, K)``, soft probabilities ``(T, K)``)."""
        logits = self.difficulty(x)
        if self.training:
            gumbel = -torch.empty_like(logits).exponential_().log()
            soft = torch.softmax((logits + gumbel) / self.temperature, dim=-1)
        else:
            soft = torch.softmax(logits, dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
        # hard + (soft - soft.detach()) is exactly the one-hot forward and d/dsoft backward.
        return hard + (soft - soft.detach()), torch.softmax(logits, dim=-1)

    def route(self, x: torch.Tensor) -> ConditionalRouting:
        probs = torch.softmax(self.router(x), dim=-1)
        top_p, top_e = probs.topk(self.k_max, dim=-1)
        choice, predicted = self.choose_k(x)
        k_values = torch.arange(self.k_min, self.k_max + 1, device=x.device)
        # mask_j = sum over k values > j of the one-hot choice (1 for every j < k_min).
        above = k_values[None, :] > torch.arange(self.k_max, device=x.device)[:, None]
        mask = choice @ above.T.to(choice.dtype)  # (T, k_max)
        weighted = top_p * mask
        # Slot 0 counts in the denominator unmasked: for k >= 1 this is the renormalised top-k,
        # k = 0 gives zero gates, and a k = 1 token's gate m_0 p_0 / p_0 carries the gradient
        # of keeping its expert.
        gates = weighted / (top_p[:, :1] + weighted[:, 1:].sum(dim=-1, keepdim=True))
        active = mask.detach() > 0.5
        return ConditionalRouting(
            experts=top_e, gates=gates, active=active, k=active.sum(dim=-1),
            expected_k=predicted @ k_values.to(predicted.dtype), probs=probs)

    def dispatch(self, x: torch.Tensor, routing: ConditionalRouting) -> torch.Tensor:
        """Run each expert only on its assigned (token, slot) pairs and scatter-add the results."""
        rows, slots = routing.active.nonzero(as_tuple=True)
        assigned = routing.experts[rows, slots]
        weights = routing.gates[rows, slots]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            pick = (assigned == e).nonzero().squeeze(1)
            if pick.numel():
                tokens = rows.index_select(0, pick)
                y = expert(x.index_select(0, tokens)) * weights.index_select(0, pick)[:, None]
                out = out.index_add(0, tokens, y)
        return out

    def balance_loss(self, routing: ConditionalRouting) -> torch.Tensor:
        """``E * sum_e f_e P_e`` (differentiable through ``P_e``); 0 for no tokens."""
        if routing.k.numel() == 0:
            return routing.probs.new_zeros(())
        load = routing.load(self.n_experts).to(routing.probs.dtype)
        share = load / load.sum().clamp(min=1)  # every token may have k = 0
        return self.n_experts * (share * routing.probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, load-balancing loss), the interface of ``bk.moe.MoEFeedForward``: the
        balance loss is a training term, 0 in eval mode."""
        routing = self.route(x)
        balance = self.balance_loss(routing) if self.training else x.new_zeros(())
        return self.dispatch(x, routing), balance


class ConditionalMoELanguageModel(LanguageModel):
    """The dense model with every block's top-1 MoE replaced by a :class:`ConditionalMoE`.

    The training objective adds ``balance_weight * mean balance loss + k_cost * mean E[k]``;
    in eval mode neither is computed (the loss is the cross-entropy, as for the dense model).
    """

    def __init__(self, cfg: ModelConfig, *, k_min: int = 1, k_max: int = 2,
                 k_cost: float = 0.01, temperature: float = 1.0) -> None:
        super().__init__(cfg)
        if k_cost < 0:
            raise ValueError(f"k_cost must be >= 0, got {k_cost}")
        self.k_cost = k_cost
        for block in self.blocks:
            block.moe = ConditionalMoE(cfg.d_model, cfg.d_expert, cfg.n_experts, k_min=k_min,
                                       k_max=k_max, temperature=temperature)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        balance = cost = x.new_zeros(())
        k_total = torch.zeros(b * n, dtype=torch.int64)
        for block in self.blocks:
            h = block.norm(x.reshape(b * n, -1))
            routing = block.moe.route(h)
            f = block.moe.dispatch(h, routing)
            g = block.resolvent(block.potential(h).view(b, n, -1))
            x = x + f.view_as(x) + block.mix(g)
            if self.training:  # training-only terms, as in the dense model
                balance = balance + block.moe.balance_loss(routing)
                cost = cost + routing.expected_k.mean()
            k_total = k_total + routing.k
        layers = len(self.blocks)
        work = Work(token_layers=b * n * layers, expert_calls=int(k_total.sum()),
                    positions=b * n * layers)
        stats = {"layers_per_token": x.new_full((b, n), float(layers)),
                 "experts_per_token": (k_total.to(x.dtype) / layers).view(b, n)}
        aux = {"balance": self.cfg.balance_weight * balance / layers,
               "k_cost": self.k_cost * cost / layers}
        return self.finish(x, targets, aux, work, stats)
