"""The ResNet-BK language model: the dense baseline every bk-bench speedup is measured against.

Each block is pre-LayerNorm and adds two things to the residual stream:

* a mixture-of-experts feed-forward of the normalised hidden state (per-token work), and
* sequence mixing through the BK-Core: a potential ``v`` (one value per BK channel) is
  projected from the normalised hidden state and added to the diagonal of the discrete
  Laplacian H0 (diagonal -2, couplings 1). The causal resolvent diagonal
  ``G_ii = [(H0 + diag(v) - z)_{0..i}]^-1_ii`` of each channel is read out as ``[Re G, Im G]``
  and projected back to ``d_model``.

Because the core is causal, logits at position i depend on tokens 0..i only, and generation can
carry one complex number per layer and channel (``init_state``/``step``) instead of re-running
the prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bk.core import causal_step, resolvent_diag
from bk.moe import MoEFeedForward

H0_DIAGONAL = -2.0
H0_COUPLING = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    n_experts: int = 4
    d_expert: int = 128
    bk_channels: int = 4
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_seq", "n_experts", "d_expert",
                     "bk_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.balance_weight < 0:
            raise ValueError(f"ModelConfig.balance_weight must be >= 0, got {self.balance_weight}")

    @classmethod
    def at_scale(cls, scale: str, **overrides: Any) -> ModelConfig:
        """The named preset (``SCALES``) with ``overrides`` (vocabulary size, sequence length)."""
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
        return replace(SCALES[scale], **overrides)


# Model sizes the harness measures at (docs/scales.md says how they were chosen). ``tiny`` is the
# size CI and --quick train; at ``small`` and ``base`` per-op fixed costs no longer dominate.
SCALES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(d_model=256, n_layers=8, d_expert=512, bk_channels=8),
    "base": ModelConfig(d_model=512, n_layers=8, d_expert=1024, bk_channels=8),
}


@dataclass
class Work:
    """Work a forward pass actually executed, counted where it runs.

    token_layers: (token, layer) pairs whose per-token work (norm, router, projections) ran.
    expert_calls: tokens passed through an expert network (top-1: one per token-layer).
    positions: (position, layer) pairs visited by the BK recurrence.
    routes_given: of the token-layers, those whose routing was given (by a cache, a table or a
    forcing) instead of computed by the router.
    """

    token_layers: int = 0
    expert_calls: int = 0
    positions: int = 0
    routes_given: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.token_layers + other.token_layers,
                    self.expert_calls + other.expert_calls,
                    self.positions + other.positions,
                    self.routes_given + other.routes_given)

    def flops(self, cfg: ModelConfig) -> float:
        """Floating-point operations of this work in the dense model's units: multiply-adds of
        the per-token projections (router, potential, read-out) and the expert's two layers,
        and about 10 real operations per channel for one step of the recurrence (eq. (1) of
        bk/core.py: a complex multiply-add and a reciprocal). Decision overheads (predictors,
        exit heads) are not work: they are what separates the ideal from the realised."""
        d, c = cfg.d_model, cfg.bk_channels
        per_token = 2 * d * (cfg.n_experts + c) + 2 * (2 * c) * d
        per_expert = 2 * 2 * d * cfg.d_expert
        per_position = 10 * c
        router = 2 * d * cfg.n_experts
        return (self.token_layers * per_token - self.routes_given * router
                + self.expert_calls * per_expert + self.positions * per_position)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, N, V)
    loss: torch.Tensor | None  # training objective: ce + sum(aux.values())
    ce: torch.Tensor | None  # mean next-token cross-entropy, nats
    work: Work
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per token, (B, N) each
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted auxiliary terms


@dataclass(frozen=True)
class DecodeState:
    """Per-layer causal resolvent value at the last position, ``(B, C)`` complex each.

    States are never modified: ``step`` returns a new one, so a search may branch from any state.
    """

    g: tuple[torch.Tensor | None, ...]
    position: int = 0

    def select(self, rows: torch.Tensor) -> DecodeState:
        """The state of batch rows ``rows`` only. Every tensor a state holds (also in a
        technique's subclass, also inside tuples) has the batch as its first dimension."""
        def pick(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.index_select(0, rows)
            if isinstance(value, tuple):
                return tuple(pick(v) for v in value)
            return value

        return replace(self, **{f.name: pick(getattr(self, f.name)) for f in fields(self)})


class BKBlock(nn.Module):
    """One ResNet-BK block: ``x + MoE(LN x) + W [Re G, Im G]`` with ``G`` from the BK-Core."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.bk_channels
        self.norm = nn.LayerNorm(cfg.d_model)
        self.moe = MoEFeedForward(cfg.d_model, cfg.d_expert, cfg.n_experts)
        self.potential = nn.Linear(cfg.d_model, c)
        self.readout = nn.Linear(2 * c, cfg.d_model)
        # Spectral shift per channel, z = re + i softplus(im): Im z > 0 by construction. The
        # spectrum of H0 lies in [-4, 0]; spreading Re z over it gives channels different
        # memory lengths.
        self.z_re = nn.Parameter(torch.linspace(-3.5, -0.5, c))
        self.z_im_raw = nn.Parameter(torch.full((c,), 0.5))
        nn.init.normal_(self.potential.weight, std=0.1)
        nn.init.zeros_(self.potential.bias)

    def shift(self) -> torch.Tensor:
        return torch.complex(self.z_re, F.softplus(self.z_im_raw))

    def token_work(self, x: torch.Tensor, valid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token part on flat tokens ``(T, d)``: (feed-forward output, potential, balance).
        ``valid`` ``(T,)`` bool marks the tokens the balance loss counts (default: all)."""
        h = self.norm(x)
        f, balance = self.moe(h, valid=valid)
        return f, self.potential(h), balance

    def resolvent(self, v: torch.Tensor) -> torch.Tensor:
        """Causal resolvent diagonal for potentials ``v`` ``(B, N, C)``; returns ``(B, N, C)``."""
        a = (H0_DIAGONAL + v).transpose(1, 2)  # (B, C, N), a view: read in place
        g = resolvent_diag(a, H0_COUPLING, H0_COUPLING, self.shift(), causal=True)
        return g.transpose(1, 2)  # stored like a: contiguous (B, N, C)

    def mix(self, g: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.cat([g.real, g.imag], dim=-1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        x = x.reshape(b * n, d)
        h = self.norm(x)
        g = self.resolvent(self.potential(h).view(b, n, -1))
        # x + f + mix(g) in one pass, summed as techniques sum token_work, resolvent and mix
        # (bit for bit the same). mix on flat rows: a result that is no view takes the sum in
        # place.
        mixed = self.readout(torch.cat([g.real, g.imag], dim=-1).view(b * n, -1))
        out, balance = self.moe(h, residual=(x, mixed))
        return out.view(b, n, d), balance

    def step(self, x: torch.Tensor, g_prev: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position for a batch ``x`` ``(B, d)``; returns (new x, this position's G)."""
        f, v, _ = self.token_work(x)
        coupling = H0_COUPLING * H0_COUPLING
        g = causal_step(H0_DIAGONAL + v, coupling, self.shift(), g_prev)
        return x + f + self.mix(g), g


class LanguageModel(nn.Module):
    """Embedding, ``n_layers`` ResNet-BK blocks, final LayerNorm and the LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(BKBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def check_tokens(self, idx: torch.Tensor) -> None:
        if idx.dtype != torch.int64:
            raise TypeError(f"token ids must be int64, got {idx.dtype}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"token ids must have shape (batch, length>0), got {tuple(idx.shape)}")
        if idx.numel():
            low, high = (int(bound) for bound in torch.aminmax(idx))
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got "
                                 f"[{low}, {high}]")

    def finish(self, x: torch.Tensor, targets: torch.Tensor | None,
               aux: Mapping[str, torch.Tensor], work: Work,
               stats: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        """Final norm and head; with targets, the loss: cross-entropy plus every ``aux`` term."""
        return self.output(self.head(self.norm(x)), targets, aux, work, stats)

    @staticmethod
    def output(logits: torch.Tensor, targets: torch.Tensor | None,
               aux: Mapping[str, torch.Tensor], work: Work,
               stats: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        """A ModelOutput for ``logits`` ``(B, N, V)``: ``loss = ce + sum(aux)`` with targets."""
        ce = loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss = ce + sum(aux.values(), ce.new_zeros(()))
        return ModelOutput(logits, loss, ce, work, stats or {}, dict(aux))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        balances = []
        for block in self.blocks:
            x, balance = block(x)
            balances.append(balance)
        layers = len(self.blocks)
        work = Work(token_layers=b * n * layers, expert_calls=b * n * layers,
                    positions=b * n * layers)
        stats = {"layers_per_token": x.new_full((b, n), float(layers))}
        aux = ({"balance": self.cfg.balance_weight * sum(balances) / layers} if self.training
               else {})
        return self.finish(x, targets, aux, work, stats)

    def init_state(self, batch_size: int) -> DecodeState:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return DecodeState(g=(None,) * len(self.blocks))

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        """Logits ``(B, V)`` for the next token after ``tokens`` ``(B,)``, and the new state."""
        self.check_tokens(tokens[:, None])
        x = self.embed(tokens)
        new_g = []
        for block, g_prev in zip(self.blocks, state.g, strict=True):
            x, g = block.step(x, g_prev)
            new_g.append(g)
        return self.head(self.norm(x)), DecodeState(tuple(new_g), state.position + 1)
