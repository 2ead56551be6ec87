"""Learned per-position sparsity: a predictor decides where a block's per-position work runs.

In each block an importance predictor (a linear map of the residual stream, one logit per
position) decides whether position ``i`` *computes* the block's per-position work, the MoE
feed-forward and the potential projection ``v_i``, or *skips* it. A skipped position is filled
cheaply and causally:

* feed-forward output 0 (the residual stream passes through unchanged), and
* potential carried from the last computed position before it in the same sequence (0, the
  free Laplacian, if there is none).

The BK recurrence still visits every position (it is O(1) per position and its state must
advance), as does the readout of ``G``: the block is ``bk.skip.run_block(..., fill="carry",
readout="all")`` on the positions that compute.

Two ways to turn decisions into the positions that run (the ``capacity`` knob):

* ``None``: every position whose decision says compute runs (``Subset.where``: a data-dependent
  number of rows);
* a fraction ``c``: at most ``K = ceil(c * n)`` positions per sequence run in each block, the
  first ``K`` that decide to compute, in position order (``Subset.capacity``: static shapes, no
  host synchronisation). ``n`` is the context length ``cfg.n_seq`` (at the block's resolution
  in the hourglass), not the length of the call, so the cap does not depend on how long the
  input is: a prefix is computed as it is inside a longer sequence, and decoding can count.

Training samples the mask with a Gumbel-sigmoid and a straight-through estimator (Jang et al.
2017; Bengio et al. 2013): the forward value is the hard 0/1 decision, the gradient that of
``sigmoid((logit + logistic noise) / tau)``. It reaches the predictor through the positions that
ran, where ``f_i = m_i * MoE(h_i)`` and ``v_i = m_i * v_i + (1 - m_i) * carry_i`` (the ``gate``
of ``run_block``), and through the sparsity loss ``weight * mean_layers (skip_rate - target)^2``
(``skip_rate`` of the decisions; a capacity is a hard ceiling on top of them). Evaluation is
deterministic: compute iff ``logit > 0`` (probability above 0.5).

:class:`PositionSparsity` holds this machinery (knobs, predictors, schedule, forcing, one block)
for every model that uses it: :class:`SparseLanguageModel` here and the combined model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from bk.core import causal_step
from bk.model import H0_COUPLING, H0_DIAGONAL, BKBlock, DecodeState, ModelConfig, ModelOutput, Work
from bk.skip import Subset, run_block
from bk.technique import Forcing, Knob, KnobError, TechniqueModel

GUMBEL_TEMPERATURE = 1.0
INITIAL_LOGIT = 3.0  # starts close to the dense model: P(compute) = sigmoid(3) = 0.95
RAMP_FRACTION = 0.5  # the target sparsity ramps from 0 over this fraction of fine-tuning
ROUNDING = 1e-9  # so that ceil(0.55 * 100) is 55, not 56 (0.55 * 100 = 55.00000000000001)

TARGET_SPARSITY = Knob("target_sparsity", float, 0.5,
                       "fraction of (position, layer) pairs whose per-position work is skipped",
                       low=0.0, high=0.95, grid=(0.25, 0.5, 0.75), search=(0.05, 0.95))
SPARSITY_WEIGHT = Knob("sparsity_weight", float, 1.0,
                       "weight of the squared deviation from the target sparsity in the loss",
                       low=0.0, grid=(0.3, 1.0, 3.0), search=(0.1, 10.0), log=True)
CAPACITY = Knob("capacity", float, None,
                "structured variant: at most ceil(capacity * n_seq) positions per sequence run "
                "in each block, the first that decide to (static shapes); none: every position "
                "that decides to runs", low=0.0, high=1.0, search=(0.1, 1.0), optional=True)


def compute_mask(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """1 where a position computes, 0 where it skips; straight-through Gumbel when training."""
    if not training:
        return (logits > 0).to(logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.rand_like(logits).clamp(tiny, 1 - tiny)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / GUMBEL_TEMPERATURE)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly ``hard`` forward, gradient of ``soft``


def slots(fraction: float, positions: int) -> int:
    """``ceil(fraction * positions)``: how many of ``positions`` a fraction of them is."""
    return math.ceil(fraction * positions - ROUNDING)


def strided(n: int, keep: float, device: torch.device | None = None) -> torch.Tensor:
    """``(n,)`` bool: evenly strided positions, ``ceil((i + 1) keep)`` of the first ``i + 1``
    (position 0 always; ``slots(keep, n)`` in all), whatever ``n`` is."""
    taken = torch.ceil(torch.arange(1, n + 1, dtype=torch.float64, device=device) * keep
                       - ROUNDING)
    return torch.diff(taken, prepend=taken.new_zeros(1)) > 0


def forced_subset(forcing: Forcing, b: int, n: int, generator: torch.Generator,
                  device: torch.device) -> Subset:
    """The positions of a ``(B, N)`` block that run under ``forcing``: the same evenly strided
    positions in every sequence (a static-shape subset), or each position independently with
    probability ``forcing.keep`` (drawn from ``generator``)."""
    if forcing.pattern == "uniform":
        select = strided(n, forcing.keep, device).expand(b, n)
        return Subset.capacity(select, slots(forcing.keep, n))
    draws = torch.rand(b * n, generator=generator, dtype=torch.float64)
    return Subset.where((draws < forcing.keep).to(device))


class PositionSparsity:
    """Learned per-position sparsity in every block, mixed into a :class:`TechniqueModel`
    (before it in the bases) that declares the knobs ``target_sparsity``, ``sparsity_weight``
    and ``capacity``: validation, the importance predictors ``importance.{i}``, the ramp
    schedule, forcing, and one block run on the positions that compute.

    The skippable unit is a (position, layer) pair's per-position work. Forced (``forced``),
    no predictor runs: ``"uniform"`` runs the same evenly strided positions, ``ceil(keep * n)``
    of each sequence's ``n``, in every block (static shapes); ``"per_token"`` runs each
    (position, layer) independently with probability ``keep``. A forced model has no capacity
    (the forcing fixes the rate) and no incremental decoding.
    """

    cfg: ModelConfig
    importance: nn.ModuleList
    forcing: Forcing | None = None

    def init_sparsity(self, target_sparsity: float, sparsity_weight: float,
                      capacity: float | None) -> None:
        self.target_sparsity = self.knob("target_sparsity").parse(target_sparsity)
        self.sparsity_weight = self.knob("sparsity_weight").parse(sparsity_weight)
        self.capacity = self.knob("capacity").parse(capacity)
        if self.capacity is not None and self.capacity <= 0:
            raise KnobError(f"knob capacity: expected a number in (0, 1] or none, got "
                            f"{capacity!r}")
        self.current_target = self.target_sparsity  # moved by ``schedule`` while fine-tuning
        self.importance = nn.ModuleList(nn.Linear(self.cfg.d_model, 1)
                                        for _ in range(self.cfg.n_layers))
        for predictor in self.importance:
            nn.init.zeros_(predictor.weight)
            nn.init.constant_(predictor.bias, INITIAL_LOGIT)

    def schedule(self, progress: float) -> None:
        """Ramp the target sparsity linearly from 0 to ``target_sparsity`` over the first
        ``RAMP_FRACTION`` of fine-tuning (``progress`` in [0, 1])."""
        super().schedule(progress)
        self.current_target = self.target_sparsity * min(1.0, progress / RAMP_FRACTION)

    def forced(self, forcing: Forcing) -> TechniqueModel:
        """This model (same weights, not a copy of them) with its decisions given by
        ``forcing``; ``self`` is unchanged."""
        model = copy.copy(self)
        model.forcing = forcing
        return model

    def block_context(self, index: int) -> int:
        """Positions of a full-length sequence where block ``index`` runs (capacity's ``n``)."""
        return self.cfg.n_seq

    def sparse_block(self, index: int, block: BKBlock, x: torch.Tensor,
                     generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Subset]:
        """Block ``index`` on ``x`` ``(B, N, d)`` with its per-position work only where it is
        decided (by the predictor, or by the forcing from ``generator``). Returns (new x, the
        block's weighted auxiliary training terms, the subset of flat positions that ran)."""
        b, n, _ = x.shape
        if self.forcing is not None:
            subset = forced_subset(self.forcing, b, n, generator, x.device)
            x, balance = run_block(block, x, subset, fill="carry", readout="all")
            return x, self._terms(balance), subset
        mask = compute_mask(self.importance[index](x).squeeze(-1), self.training)
        select = mask.detach() == 1
        if self.capacity is None:
            subset = Subset.where(select.reshape(-1))
        else:
            k = min(slots(self.capacity, self.block_context(index)), n)
            subset = Subset.capacity(select, k)
        gate = subset.gather(mask.reshape(-1)) if mask.requires_grad else None
        x, balance = run_block(block, x, subset, fill="carry", readout="all", gate=gate)
        return x, self._terms(balance, mask), subset

    def _terms(self, balance: torch.Tensor, mask: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """The weighted training terms of one block: MoE balance and, for the decisions
        ``mask``, the squared deviation of their skip rate from the current target."""
        if not self.training:
            return {}
        terms = {"balance": self.cfg.balance_weight * balance}
        if mask is not None:
            skip_rate = 1 - mask.mean()
            terms["sparsity"] = self.sparsity_weight * (skip_rate - self.current_target) ** 2
        return terms


@dataclass(frozen=True)
class SparseDecodeState(DecodeState):
    """The dense state plus, per layer, the potential of the last position that computed
    (``(B, C)``, the carry of the next skipped position) and, with a capacity, how many
    positions of each sequence ran (``(B,)`` int64). ``None``: no position yet."""

    potential: tuple[torch.Tensor | None, ...] = ()
    ran: tuple[torch.Tensor | None, ...] = ()


class SparseLanguageModel(PositionSparsity, TechniqueModel):
    """The dense model (same parameter names) plus an importance predictor per block,
    ``importance.{i}``. The skippable unit and the forcing patterns: :class:`PositionSparsity`.

    ``step`` computes what ``forward`` computes in evaluation mode (decisions ``logit > 0``).
    """

    KNOBS = (TARGET_SPARSITY, SPARSITY_WEIGHT, CAPACITY)

    def __init__(self, cfg: ModelConfig, *, target_sparsity: float = 0.5,
                 sparsity_weight: float = 1.0, capacity: float | None = None) -> None:
        super().__init__(cfg)
        self.init_sparsity(target_sparsity, sparsity_weight, capacity)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        generator = self.forcing.generator() if self.forcing is not None else None
        aux: dict[str, torch.Tensor] = {}
        computed_layers = x.new_zeros(b, n)
        rows = 0
        for index, block in enumerate(self.blocks):
            x, terms, subset = self.sparse_block(index, block, x, generator)
            for name, term in terms.items():
                aux[name] = aux.get(name, 0) + term
            computed_layers = computed_layers + subset.mask().view(b, n)
            rows += subset.size  # with a capacity, padding rows run too
        layers = len(self.blocks)
        work = Work(token_layers=rows, expert_calls=rows, positions=b * n * layers)
        stats = {"layers_per_token": computed_layers,
                 "sparsity": 1 - computed_layers / layers}
        aux = {name: term / layers for name, term in aux.items()}
        return self.finish(x, targets, aux, work, stats)

    def init_state(self, batch_size: int) -> SparseDecodeState:
        self._check_decodes()
        layers = len(self.blocks)
        return SparseDecodeState(g=super().init_state(batch_size).g,
                                 potential=(None,) * layers, ran=(None,) * layers)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, SparseDecodeState]:
        self._check_decodes()
        if not isinstance(state, SparseDecodeState):
            raise TypeError(f"state must be a SparseDecodeState from init_state, got "
                            f"{type(state).__name__}")
        self.check_tokens(tokens[:, None])
        x = self.embed(tokens)
        b = x.shape[0]
        new_g, new_potential, new_ran = [], [], []
        for index, (block, predictor) in enumerate(zip(self.blocks, self.importance,
                                                       strict=True)):
            select = predictor(x).squeeze(-1) > 0
            ran = state.ran[index]
            if self.capacity is not None:
                ran = ran if ran is not None else torch.zeros(b, dtype=torch.int64,
                                                              device=x.device)
                select = select & (ran < slots(self.capacity, self.block_context(index)))
                ran = ran + select
            subset = Subset.where(select)
            f, v, _ = block.token_work(subset.gather(x))
            carry = state.potential[index]
            carry = carry if carry is not None else v.new_zeros(b, v.shape[-1])
            potential = subset.scatter(carry, v)  # skipped rows keep the carry
            g = causal_step(H0_DIAGONAL + potential, H0_COUPLING * H0_COUPLING, block.shift(),
                            state.g[index])
            x = subset.add(x + block.mix(g), f)
            new_g.append(g)
            new_potential.append(potential)
            new_ran.append(ran)
        return self.head(self.norm(x)), SparseDecodeState(
            tuple(new_g), state.position + 1, tuple(new_potential), tuple(new_ran))

    def _check_decodes(self) -> None:
        if self.forcing is not None:
            raise NotImplementedError("a forced SparseLanguageModel does not decode "
                                      "incrementally (its decisions are drawn per forward "
                                      "pass); use forward()")
