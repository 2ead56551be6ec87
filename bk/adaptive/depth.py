"""Depth decisions: forced depths for the depth techniques, and Mixture-of-Depths routing.

ACT (bk/adaptive/act.py) and early exit (bk/adaptive/early_exit.py) decide per token how many
layers it runs; their ceilings (:meth:`bk.technique.TechniqueModel.forced`) take the depths from
:func:`forced_depths` instead. :class:`CapacityDepthModel` decides per token and layer whether
the token runs the layer, under a static capacity (Raposo et al. 2024, arXiv:2404.02258).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from bk.model import DecodeState, ModelConfig, ModelOutput, Work
from bk.skip import Subset, run_block, step_block
from bk.technique import Forcing, Knob, KnobError, TechniqueModel

Model = TypeVar("Model", bound=TechniqueModel)


def forced_copy(model: Model, forcing: Forcing) -> Model:
    """``model`` with its decisions given by ``forcing``: a shallow copy sharing its weights
    (``model`` itself is unchanged). It is a forward-only ceiling and does not decode."""
    if not isinstance(forcing, Forcing):
        raise TypeError(f"forcing must be a bk.technique.Forcing, got {type(forcing).__name__}")
    forced = copy.copy(model)
    forced.forcing = forcing
    forced.DECODES = False
    forced.NO_DECODE_REASON = "a forced model (decisions given for free) only runs forward"
    return forced


def forced_depths(forcing: Forcing, n_layers: int, tokens: int) -> torch.Tensor:
    """Layers each of ``tokens`` flat tokens runs under ``forcing``: int64 ``(tokens,)`` in
    ``[1, n_layers]``, a token-layer being the skippable unit (a token runs a prefix of the layers).

    ``"uniform"``: every token runs ``D = max(1, floor(keep * L + 1/2))`` layers, ``keep * L``
    rounded half up to whole layers (a token runs whole layers, so the work rate is ``D / L``,
    within ``1 / (2L)`` of ``keep`` for ``keep >= 1 / (2L)``). ``"per_token"``: independent depths
    ``1 + Binomial(L - 1, q)``, ``q = (keep L - 1) / (L - 1)``, whose mean is exactly ``keep * L``
    (for ``keep >= 1 / L``; every token runs at least one layer, so below that every depth is 1).
    """
    if forcing.pattern == "uniform":
        depth = max(1, math.floor(forcing.keep * n_layers + 0.5))
        return torch.full((tokens,), depth, dtype=torch.int64)
    if n_layers == 1:
        return torch.ones(tokens, dtype=torch.int64)
    q = min(1.0, max(0.0, (forcing.keep * n_layers - 1) / (n_layers - 1)))
    draws = torch.rand(n_layers - 1, tokens, generator=forcing.generator(), dtype=torch.float64)
    return 1 + (draws < q).sum(dim=0)


def routed_layers(routed: str, n_layers: int) -> list[int]:
    """The layers (0-based) a :class:`CapacityDepthModel` routes."""
    if routed == "alternate":
        return list(range(1, n_layers, 2))
    return list(range(1, n_layers - 1))  # "inner"


def straight_through(score: torch.Tensor) -> torch.Tensor:
    """1 in value, with the gradient of ``sigmoid(score)``."""
    r = torch.sigmoid(score)
    return 1 + (r - r.detach())  # r - r.detach() is exactly 0, so the value is exactly 1


class DepthRouting:
    """Mixture-of-Depths capacity routing of chosen blocks, mixed into a :class:`TechniqueModel`
    (before it in the bases): the routers ``routers.{i}``, the budget, the decisions (learned
    or forced) and one routed block. :class:`CapacityDepthModel` documents the rule; a block's
    window is its ``context`` positions (``n_seq`` at full resolution).

    ``DEPTH_CAPACITY`` names the knob holding the capacity (``capacity`` in
    :class:`CapacityDepthModel`; a model that also has other capacities renames it).
    """

    DEPTH_CAPACITY: ClassVar[str] = "capacity"
    cfg: ModelConfig
    routers: nn.ModuleDict
    forcing: Forcing | None = None

    def init_routing(self, layers: list[int]) -> None:
        """Routers for ``layers`` (bias 0, PyTorch's default weights)."""
        self.routers = nn.ModuleDict({str(layer): nn.Linear(self.cfg.d_model, 1)
                                      for layer in layers})
        for router in self.routers.values():
            nn.init.zeros_(router.bias)

    def budget(self, context: int | None = None) -> int:
        """``k``: tokens of each window of ``context`` (default ``n_seq``) positions that may
        run a routed layer."""
        context = self.cfg.n_seq if context is None else context
        keep = getattr(self, self.DEPTH_CAPACITY) if self.forcing is None else self.forcing.keep
        return max(1, math.floor(keep * context))

    def decide(self, layer: int, x: torch.Tensor, context: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Selection ``(B, N)`` bool for ``layer`` and the router scores (None when forced)."""
        b, n, _ = x.shape
        if self.forcing is None:
            score = self.routers[str(layer)](x).squeeze(-1)
            return score > 0, score
        if self.forcing.pattern == "uniform":  # exactly the budget k, evenly strided
            rate = self.budget(context) / context
            j = torch.arange(n, dtype=torch.float64, device=x.device) % context
            return ((j + 1) * rate).floor().gt((j * rate).floor()).expand(b, n), None
        draws = torch.rand(b, n, generator=generator, dtype=torch.float64)
        return draws.to(x.device) < self.forcing.keep, None

    def routed_block(self, layer: int, block: nn.Module, x: torch.Tensor, context: int,
                     generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Subset]:
        """Routed block ``layer`` on ``x`` ``(B, N, d)`` with windows of ``context`` positions:
        (new x, MoE balance loss, the router loss (None when forced or not training), the
        subset of the padded flat positions that ran)."""
        b, n, _ = x.shape
        window = min(n, context)
        pad = -n % window  # the last window of a sequence longer than context, filled up
        k = min(self.budget(context), window)
        select, score = self.decide(layer, x, context, generator)
        subset = Subset.capacity(padded(select, pad).reshape(-1, window), k)
        gate = router_loss = None
        if score is not None:
            gate = straight_through(subset.gather(padded(score, pad).reshape(-1)))
            if self.training:
                router_loss = F.binary_cross_entropy_with_logits(
                    score, top_k_targets(score.detach(), window, k))
        out, balance = run_block(block, padded(x, pad), subset, fill="zero", readout="ran",
                                 scale=gate)
        return out[:, :n], balance, router_loss, subset


@dataclass(frozen=True)
class CapacityState(DecodeState):
    """A :class:`DecodeState` with, per routed layer, the tokens of each sequence that ran it
    so far in the current window of ``n_seq`` positions: ``ran`` ``(routed layers, B)``."""

    ran: torch.Tensor | None = None


class CapacityDepthModel(DepthRouting, TechniqueModel):
    """Mixture-of-Depths capacity routing over the layers of ResNet-BK (Raposo et al. 2024).

    In each routed layer a linear router scores every token from the block's input, ``s =
    w . x + b``, and the token is *selected* if ``s > 0``. At most ``k = max(1, floor(capacity
    * n_seq))`` tokens of each window of ``n_seq`` positions run the block: the first ``k``
    selected ones in position order (:meth:`bk.skip.Subset.capacity`: ``B * k`` rows per window,
    static, no host synchronisation), so whether position ``i`` runs depends on positions
    ``<= i`` only. A sequence of ``N <= n_seq`` positions is one window (``min(k, N)`` rows);
    longer ones restart the budget every ``n_seq`` positions, so the rate stays ``capacity`` at
    any length and decoding carries only a count per routed layer (:class:`CapacityState`).
    The budget is per ``n_seq`` positions rather than per sequence length so that logits at
    ``i`` never depend on how long the sequence is (a prefix computes what the whole computes).

    A token that runs adds ``gate * update``, where ``update`` is the block's (feed-forward
    plus read-out); one that does not passes through (:func:`bk.skip.run_block`, ``fill="zero"``,
    ``readout="ran"``: its potential is 0, the BK recurrence passes through H0 there). MoD uses
    ``gate = r = router output``, so the task loss trains the router. Here ``gate`` is 1 in value
    with the gradient of ``sigmoid(s)`` (:func:`straight_through`): the router receives MoD's
    task gradient ``dL/dr * sigmoid'(s)``, and a selected token computes exactly the dense
    block, so fine-tuning starts from the dense function on every token that runs. A gate of
    value ``sigmoid(s)`` (or ``2 sigmoid(s)``) would not: selection needs ``s > 0``, where
    ``2 sigmoid(s) > 1``, and the router loss below, which raises ``s`` for the tokens that
    should run, would scale their updates away from the dense block's (towards 2x).

    Router loss (training only): ``router_loss_weight`` times the mean over routed layers of
    the binary cross-entropy of ``sigmoid(s)`` against "``s`` is among the ``k`` largest scores
    of its window" (MoD section 3.5): it trains the causal rule ``s > 0`` to select about
    ``capacity`` of the tokens, spread by score over the window, so that the causal first-``k``
    rarely turns away late tokens or leaves capacity unused. (Targets "ran under the first-k"
    would only ever lower the selection: tokens turned away are pushed down, unused capacity
    never pushes anything up.) Routers start with bias 0 and PyTorch's default weights: about
    half of the tokens selected, from the token's state, not its position.

    Routed layers (``routed``): ``"alternate"`` (the default: layers 1, 3, 5, ...) interleaves
    routed and full blocks, the arrangement Raposo et al. found best; ``"inner"`` routes all but
    the first and the last. Layer 0 is never routed: its router would see only the embedding.

    ``Work`` counts the ``B * k`` gathered rows of a routed layer (padding rows, where fewer
    than ``k`` tokens were selected, run too: static shapes) and every position of the
    recurrence; ``stats["layers_per_token"]`` counts the layers each real token ran.

    Forcing (the ceiling, :meth:`forced`): the skippable unit is a token-layer of a routed
    layer (unrouted layers always run). The forced model runs no router and routes with
    capacity ``keep``: ``"uniform"`` selects evenly strided positions (position ``j`` of its
    window when ``floor((j + 1) r) > floor(j r)``, ``r = k / n_seq``), exactly ``k`` per full
    window;
    ``"per_token"`` selects each token at random with probability ``keep`` (the capacity
    still applies). Its work rate on the routed layers is ``k / n_seq`` for ``N = n_seq``.
    """

    KNOBS: ClassVar[tuple[Knob, ...]] = (
        Knob("capacity", float, 0.5, "fraction of the tokens of each n_seq window that may run "
             "a routed layer", low=0.01, high=1.0, grid=(0.25, 0.5, 0.75), search=(0.125, 1.0)),
        Knob("routed", str, "alternate", "routed layers: 'alternate' (1, 3, 5, ...) or 'inner' "
             "(all but the first and last)", choices=("alternate", "inner"),
             grid=("alternate", "inner")),
        Knob("router_loss_weight", float, 0.1, "weight of the routers' cross-entropy towards "
             "the top-capacity tokens", low=0.0, grid=(0.01, 0.1, 1.0), search=(1e-3, 1.0),
             log=True),
    )

    def __init__(self, cfg: ModelConfig, *, capacity: float = 0.5, routed: str = "alternate",
                 router_loss_weight: float = 0.1) -> None:
        super().__init__(cfg)
        knobs = self.resolve_knobs({"capacity": capacity, "routed": routed,
                                    "router_loss_weight": router_loss_weight})
        self.capacity = knobs["capacity"]
        self.routed = knobs["routed"]
        self.router_loss_weight = knobs["router_loss_weight"]
        layers = routed_layers(self.routed, cfg.n_layers)
        if not layers:
            raise KnobError(f"knob routed: {self.routed!r} routes no layer of a "
                            f"{cfg.n_layers}-layer model")
        self.forcing: Forcing | None = None
        self.init_routing(layers)

    def forced(self, forcing: Forcing) -> CapacityDepthModel:
        return forced_copy(self, forcing)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        generator = self.forcing.generator() if self.forcing is not None else None
        x = self.embed(idx)
        layers = x.new_zeros(b, n)
        balance = x.new_zeros(())
        router_losses = []
        work = Work()
        for layer, block in enumerate(self.blocks):
            if str(layer) not in self.routers:
                x, layer_balance = block(x)
                balance = balance + layer_balance
                layers = layers + 1
                work = work + Work(token_layers=b * n, expert_calls=b * n, positions=b * n)
                continue
            x, layer_balance, router_loss, subset = self.routed_block(
                layer, block, x, self.cfg.n_seq, generator)
            if router_loss is not None:
                router_losses.append(router_loss)
            balance = balance + layer_balance
            padded_n = subset.total // b
            layers = layers + subset.mask().view(b, padded_n)[:, :n]
            work = work + Work(token_layers=subset.size, expert_calls=subset.size,
                               positions=b * padded_n)
        aux = {}
        if self.training:
            aux["balance"] = self.cfg.balance_weight * balance / len(self.blocks)
            if router_losses:
                aux["router"] = self.router_loss_weight * torch.stack(router_losses).mean()
        return self.finish(x, targets, aux, work, {"layers_per_token": layers})

    def init_state(self, batch_size: int) -> CapacityState:
        state = super().init_state(batch_size)
        ran = torch.zeros(len(self.routers), batch_size, dtype=torch.int64)
        return CapacityState(state.g, state.position, ran)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, CapacityState]:
        """Logits ``(B, V)`` for the next token after ``tokens`` ``(B,)``: ``forward``'s
        function one position at a time; ``state`` counts the tokens that ran each routed
        layer in the current window."""
        if not self.DECODES:
            return super().step(tokens, state)  # raises, saying why
        self.check_tokens(tokens[:, None])
        if not isinstance(state, CapacityState) or state.ran is None:
            raise TypeError(f"CapacityDepthModel.step needs the CapacityState of its init_state "
                            f"or step (it counts the tokens run per layer), got "
                            f"{type(state).__name__}")
        ran = state.ran if state.position % self.cfg.n_seq else torch.zeros_like(state.ran)
        k = self.budget()
        x = self.embed(tokens)
        new_g, new_ran = [], []
        for layer, (block, g_prev) in enumerate(zip(self.blocks, state.g, strict=True)):
            if str(layer) not in self.routers:
                x, g = block.step(x, g_prev)
            else:
                count = ran[len(new_ran)]
                score = self.routers[str(layer)](x).squeeze(-1)
                select = (score > 0) & (count < k)
                subset = Subset.where(select)
                x, g = step_block(block, x, subset, g_prev,
                                  scale=straight_through(subset.gather(score)))
                new_ran.append(count + select)
            new_g.append(g)
        return (self.head(self.norm(x)),
                CapacityState(tuple(new_g), state.position + 1, torch.stack(new_ran)))


def padded(t: torch.Tensor, pad: int) -> torch.Tensor:
    """``t`` ``(B, N, ...)`` with ``pad`` positions of zeros (False) appended."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)


def top_k_targets(score: torch.Tensor, window: int, k: int) -> torch.Tensor:
    """1 where a score ``(B, N)`` is among the ``k`` largest of its window of ``window``
    positions, else 0 (the router loss's targets)."""
    b, n = score.shape
    windows = F.pad(score, (0, -n % window), value=-math.inf).view(-1, window)
    top = windows.topk(k, dim=1).indices
    targets = torch.zeros_like(windows).scatter(1, top, 1.0)
    return targets.view(b, -1)[:, :n]
