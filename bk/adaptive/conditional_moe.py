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
gradient into the renormalised gates. The straight-through gradient of an inactive slot's mask
is ``<dL/dy, p_(j) E_(j)(x)> / sum`` (minus its share of the renormalisation), which needs the
expert's output although its gate is 0: so in training every one of the ``k_max`` slots runs its
expert, gated by its mask (0 in the forward pass for an inactive slot, whose expert parameters
therefore get no gradient from it), and in evaluation only the active slots run (sparse
dispatch). Running only the active slots in training as well drops that term: a token that
chose fewer experts then hears only the cost penalty, never what the experts it skipped would
have given, and the choice collapses to ``k_min`` (measured: with ``k_min = 0`` at ``small``,
every token ended with no expert, from scratch and fine-tuned alike; ``docs/routing.md``). The
cost penalty ``k_cost * E_soft[k]`` also reaches the predictor. In eval mode ``k`` is the argmax.

The load-balancing loss generalises the switch loss (Fedus et al. 2021, eq. 4) to top-k:
``E * sum_e f_e P_e`` with ``f_e`` the share of expert assignments that went to expert ``e``.

``k`` depends on the token's own hidden state only, so the model stays causal and decodes one
position at a time exactly as ``forward`` computes (the dense ``step`` runs each block's
``token_work``, which here is the conditional MoE).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bk.model import BKBlock, DecodeState, ModelConfig, ModelOutput, Work
from bk.moe import Expert
from bk.skip import Subset
from bk.technique import Forcing, Knob, KnobError, TechniqueModel

INITIAL_PREFERENCE = 2.0  # difficulty logit of k = 1 at initialisation (the others are 0)


@dataclass
class ConditionalRouting:
    """Routing for flat tokens ``(T, d)``: the top-``k_max`` experts and which slots are active."""

    experts: torch.Tensor  # (T, k_max) int64, descending router probability
    gates: torch.Tensor  # (T, k_max) renormalised gate weights, 0 on inactive slots
    active: torch.Tensor  # (T, k_max) bool, slot j active iff j < k
    runs: torch.Tensor  # (T, k_max) bool, slots whose expert runs: active; all in training
    k: torch.Tensor  # (T,) int64 experts used per token
    expected_k: torch.Tensor  # (T,) differentiable E[k] under the predictor's distribution
    probs: torch.Tensor  # (T, E) router distribution

    def load(self, n_experts: int) -> torch.Tensor:
        """Tokens each expert receives, ``(E,)`` int64; sums to ``k.sum()``."""
        return torch.zeros(n_experts, dtype=torch.int64, device=self.k.device).index_add_(
            0, self.experts.reshape(-1), self.active.reshape(-1).long())


class ConditionalMoE(nn.Module):
    """Top-k mixture of experts with a learned per-token ``k``, over flat tokens ``(T, d)``.

    Keeps the dense model's parameter names (``router``, ``experts.{e}``); the difficulty
    predictor is new (``difficulty``). ``forward`` has the interface of
    ``bk.moe.MoEFeedForward`` (output, balance loss) and keeps the routing it used in
    ``last_routing``, from which the model reads ``k`` and the cost term.
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
        self.last_routing: ConditionalRouting | None = None

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

    def route(self, x: torch.Tensor, k: torch.Tensor | None = None) -> ConditionalRouting:
        """Routing of flat tokens ``x``; ``k`` ``(T,)`` int64 in ``[0, k_max]``, if given, is
        used as it is and the difficulty predictor does not run (a forced model)."""
        probs = torch.softmax(self.router(x), dim=-1)
        top_p, top_e = probs.topk(self.k_max, dim=-1)
        slots = torch.arange(self.k_max, device=x.device)
        if k is None:
            choice, predicted = self.choose_k(x)
            k_values = torch.arange(self.k_min, self.k_max + 1, device=x.device)
            # mask_j = sum over k values > j of the one-hot choice (1 for every j < k_min).
            above = k_values[None, :] > slots[:, None]
            mask = choice @ above.T.to(choice.dtype)  # (T, k_max)
            expected_k = predicted @ k_values.to(predicted.dtype)
        else:
            mask = (slots[None, :] < k[:, None]).to(probs.dtype)
            expected_k = k.to(probs.dtype)
        weighted = top_p * mask
        # Slot 0 counts in the denominator unmasked: for k >= 1 this is the renormalised top-k,
        # k = 0 gives zero gates, and a k = 1 token's gate m_0 p_0 / p_0 carries the gradient
        # of keeping its expert.
        gates = weighted / (top_p[:, :1] + weighted[:, 1:].sum(dim=-1, keepdim=True))
        active = mask.detach() > 0.5
        runs = torch.ones_like(active) if self.training else active
        return ConditionalRouting(experts=top_e, gates=gates, active=active, runs=runs,
                                  k=active.sum(dim=-1), expected_k=expected_k, probs=probs)

    def dispatch(self, x: torch.Tensor, routing: ConditionalRouting) -> torch.Tensor:
        """Run each expert only on the tokens whose slot for it runs (``routing.runs``; one
        :class:`Subset` per expert) and add its gated output back to their rows. Top-k
        experts are distinct, so a token uses an expert through at most one slot."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            uses = (routing.experts == e) & routing.runs  # (T, k_max), at most one per row
            tokens = Subset.where(uses.any(dim=-1))
            if tokens.size:
                gate = (routing.gates * uses).sum(dim=-1)
                y = expert(tokens.gather(x)) * tokens.gather(gate)[:, None]
                out = tokens.add(out, y)
        return out

    def balance_loss(self, routing: ConditionalRouting) -> torch.Tensor:
        """``E * sum_e f_e P_e`` (differentiable through ``P_e``); 0 for no tokens."""
        if routing.k.numel() == 0:
            return routing.probs.new_zeros(())
        load = routing.load(self.n_experts).to(routing.probs.dtype)
        share = load / load.sum().clamp(min=1)  # every token may have k = 0
        return self.n_experts * (share * routing.probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, load-balancing loss), the interface of ``bk.moe.MoEFeedForward``: the
        balance loss is a training term, 0 in eval mode. ``k`` as in :meth:`route`."""
        routing = self.route(x, k)
        self.last_routing = routing
        balance = self.balance_loss(routing) if self.training else x.new_zeros(())
        return self.dispatch(x, routing), balance


class ConditionalBlock(BKBlock):
    """A ResNet-BK block whose feed-forward is a :class:`ConditionalMoE`.

    Its per-token work is the block's definition, ``LN -> moe -> potential``, run through
    ``self.moe`` (a fused top-1 router path does not apply to a conditional MoE).
    """

    def __init__(self, cfg: ModelConfig, *, k_min: int, k_max: int, temperature: float) -> None:
        super().__init__(cfg)
        self.moe = ConditionalMoE(cfg.d_model, cfg.d_expert, cfg.n_experts, k_min=k_min,
                                  k_max=k_max, temperature=temperature)

    def token_work(self, x: torch.Tensor, k: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        f, balance = self.moe(h, k)
        return f, self.potential(h), balance

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        f, v, balance = self.token_work(x.reshape(b * n, d), k)
        return x + f.view(b, n, d) + self.mix(self.resolvent(v.view(b, n, -1))), balance


class ConditionalMoELanguageModel(TechniqueModel):
    """The dense model with every block's top-1 MoE replaced by a :class:`ConditionalMoE`.

    The training objective adds ``aux["balance"] = balance_weight * mean balance loss`` and
    ``aux["k_cost"] = k_cost * mean E[k]`` (means over layers); in eval mode neither exists.
    ``stats["experts_per_token"]`` is each token's ``k`` averaged over the layers;
    ``Work.expert_calls`` counts the expert calls that ran (``k`` per token and layer in
    evaluation, ``k_max`` in training, where every slot runs).

    Forcing (:meth:`forced`): the skippable unit is the expert call, and ``keep`` is the share
    of ``k_max`` expert calls per (token, layer) that run. ``"uniform"``: every token uses the
    same ``k = round(keep * k_max)`` in every layer (so the rate is ``keep`` rounded to a
    multiple of ``1 / k_max``); ``"per_token"``: each of a token's ``k_max`` slots is kept
    independently with probability ``keep``, so ``k ~ Binomial(k_max, keep)`` per (token,
    layer), mean ``keep * k_max``. Forced ``k`` may lie below ``k_min``. The difficulty
    predictor does not run; the draws are made once per batch shape, outside the timed call.
    """

    KNOBS = (
        Knob("k_min", int, 1, "fewest experts per token (0: a token may skip the feed-forward)",
             low=0, grid=(0, 1), search=(0, 1)),
        Knob("k_max", int, 2, "most experts per token (at most n_experts)", low=1,
             grid=(2, 3, 4), search=(1, 4)),
        Knob("k_cost", float, 0.01, "weight of the expected-k penalty in the objective",
             low=0.0, grid=(0.0, 0.01, 0.05), search=(1e-4, 0.2), log=True),
        Knob("temperature", float, 1.0,
             "Gumbel-softmax temperature of the k choice during fine-tuning (> 0)", low=0.0,
             grid=(1.0,), search=(0.3, 3.0), log=True),
    )

    def __init__(self, cfg: ModelConfig, *, k_min: int = 1, k_max: int = 2,
                 k_cost: float = 0.01, temperature: float = 1.0) -> None:
        super().__init__(cfg)
        knobs = self.resolve_knobs({"k_min": k_min, "k_max": k_max, "k_cost": k_cost,
                                    "temperature": temperature})
        if knobs["k_max"] > cfg.n_experts:
            raise KnobError(f"knob k_max: expected at most n_experts ({cfg.n_experts}), got "
                            f"{knobs['k_max']}")
        if knobs["k_min"] > knobs["k_max"]:
            raise KnobError(f"knob k_min: expected at most k_max ({knobs['k_max']}), got "
                            f"{knobs['k_min']}")
        if not knobs["temperature"] > 0:
            raise KnobError(f"knob temperature: expected a number > 0, got {temperature!r}")
        self.k_min, self.k_max = knobs["k_min"], knobs["k_max"]
        self.k_cost, self.temperature = knobs["k_cost"], knobs["temperature"]
        self.blocks = nn.ModuleList(
            ConditionalBlock(cfg, k_min=self.k_min, k_max=self.k_max,
                             temperature=self.temperature) for _ in range(cfg.n_layers))
        self.forcing: Forcing | None = None
        self._forced_k: dict[int, torch.Tensor] = {}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        forced_k = self.forced_k(b * n) if self.forcing is not None else None
        balance = cost = x.new_zeros(())
        k_total = torch.zeros(b * n, dtype=torch.int64, device=idx.device)
        calls = torch.zeros((), dtype=torch.int64, device=idx.device)
        for layer, block in enumerate(self.blocks):
            x, layer_balance = block(x, None if forced_k is None else forced_k[layer])
            routing = block.moe.last_routing
            if self.training:  # training-only terms, as in the dense model
                balance = balance + layer_balance
                cost = cost + routing.expected_k.mean()
            k_total = k_total + routing.k
            calls = calls + routing.runs.sum()
        layers = len(self.blocks)
        work = Work(token_layers=b * n * layers, expert_calls=int(calls),
                    positions=b * n * layers)
        stats = {"layers_per_token": x.new_full((b, n), float(layers)),
                 "experts_per_token": (k_total.to(x.dtype) / layers).view(b, n)}
        aux = ({"balance": self.cfg.balance_weight * balance / layers,
                "k_cost": self.k_cost * cost / layers} if self.training else {})
        return self.finish(x, targets, aux, work, stats)

    def forced(self, forcing: Forcing) -> ConditionalMoELanguageModel:
        forced = copy.copy(self)
        forced.forcing = forcing
        forced._forced_k = {}
        return forced

    def forced_k(self, tokens: int) -> torch.Tensor:
        """``(n_layers, tokens)`` int64 experts per (layer, token) under the forcing, drawn
        once per token count."""
        if tokens not in self._forced_k:
            forcing, shape = self.forcing, (len(self.blocks), tokens)
            if forcing.pattern == "uniform":
                k = torch.full(shape, math.floor(forcing.keep * self.k_max + 0.5))
            else:
                keep = torch.rand(*shape, self.k_max, generator=forcing.generator())
                k = (keep < forcing.keep).sum(dim=-1)
            self._forced_k[tokens] = k.to(self.embed.weight.device)
        return self._forced_k[tokens]

    def init_state(self, batch_size: int) -> DecodeState:
        self._check_not_forced()
        return super().init_state(batch_size)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        self._check_not_forced()
        return super().step(tokens, state)

    def _check_not_forced(self) -> None:
        if self.forcing is not None:
            raise NotImplementedError("a forced model measures forward ceilings; it does not "
                                      "decode")
