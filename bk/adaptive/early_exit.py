"""Early exit: a token stops after the first layer whose own prediction is confident enough.

After layer ``l`` (``min_exit_layer <= l < n_layers``) a token's exit logits are
``head(exit_norms[l-1](x))``: the shared LM head behind a per-layer LayerNorm. The token exits
when its exit confidence, the largest softmax probability of those logits, is at least
``exit_threshold``; its output logits are then that layer's exit logits. Tokens that never exit
use the final norm and head after layer ``n_layers``.

Carry rule (the same in training, inference and ``step``). Once a token has exited:

* none of its per-token work runs in later layers (norm, experts, potential, readout, exit
  heads): running tokens are gathered, computed and scattered back;
* its hidden state is carried unchanged (it is no longer read: its logits are fixed);
* its potential is held at 0 in later layers, so at its position the BK recurrence
  (bk/core.py eq. (1)) passes through the bare Laplacian H0: ``a_i = -2``. Tokens after it still
  see a well-defined causal prefix.

In each layer the recurrence is run only where it is read: on the sequences that still have a
running token, up to the last running position (the recurrence is causal, so later positions
cannot change earlier values).

Monotonicity. With the carry rule a running token's hidden state depends on which earlier tokens
of its sequence have exited (their potentials become 0), so loosening the threshold can change a
later token's confidence either way: neither the per-token exit layer nor the average exit layer
is monotone in the threshold in general, and no rule that skips the exited tokens' work can
make it so (their contribution to the recurrence would have to equal the one they make when
running, which needs that work). What is true: a token whose hidden states do not depend on the
exit pattern, such as position 0 of every sequence or every token when sequence mixing is
switched off, exits no later when the threshold is lowered.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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


class EarlyExitLanguageModel(LanguageModel):
    """The ResNet-BK language model with confidence-based early exit per token.

    Parameters shared with :class:`LanguageModel` keep its names; the exit norms are new
    (``exit_norms.{l-1}`` serves the exit after layer ``l``). The training objective adds
    ``exit_loss_weight`` times the mean, over exit layers, of the cross-entropy of the exit
    logits of the tokens that reached that layer, so every exit head is trained.
    """

    def __init__(self, cfg: ModelConfig, *, exit_threshold: float = 0.9,
                 min_exit_layer: int = 1, exit_loss_weight: float = 1.0) -> None:
        super().__init__(cfg)
        self.exit_norms = nn.ModuleList(nn.LayerNorm(cfg.d_model)
                                        for _ in range(cfg.n_layers - 1))
        self.exit_threshold = exit_threshold
        self.min_exit_layer = min_exit_layer
        self.exit_loss_weight = exit_loss_weight
        self.check_settings()

    def check_settings(self) -> None:
        t = self.exit_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ValueError(f"exit_threshold must be a number >= 0 (above 1: never exit), "
                             f"got {t!r}")
        m = self.min_exit_layer
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.cfg.n_layers:
            raise ValueError(f"min_exit_layer must be an integer in [1, n_layers="
                             f"{self.cfg.n_layers}], got {m!r}")
        w = self.exit_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"exit_loss_weight must be a number >= 0, got {w!r}")

    def exit_layers(self) -> range:
        """Layers after which a token may exit early (the last layer always ends the model)."""
        return range(self.min_exit_layer, self.cfg.n_layers)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        self.check_settings()
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)}")
        b, n = idx.shape
        layers = self.cfg.n_layers
        x = self.embed(idx).reshape(b * n, -1)
        flat_targets = targets.reshape(-1) if targets is not None else None
        running = torch.arange(b * n)
        exit_layer = torch.full((b * n,), layers, dtype=torch.long)
        done_ids, done_logits, exit_ce = [], [], []
        balance = x.new_zeros(())
        work = Work()
        # Confidence never exceeds 1, so above 1 the exit heads cannot change anything and are
        # not computed, except in training where they are trained.
        may_exit = self.training or self.exit_threshold <= 1
        for layer, block in enumerate(self.blocks, start=1):
            x, layer_balance, layer_work = run_block(block, x, running, b, n)
            balance = balance + layer_balance
            work = work + layer_work
            if layer in self.exit_layers() and may_exit:
                logits = self.head(self.exit_norms[layer - 1](x.index_select(0, running)))
                if self.training and flat_targets is not None:
                    exit_ce.append(F.cross_entropy(logits, flat_targets.index_select(0, running)))
                confidence = torch.softmax(logits.detach(), dim=-1).amax(dim=-1)
                exits = confidence >= self.exit_threshold
                done_ids.append(running[exits])
                done_logits.append(logits[exits])
                exit_layer[running[exits]] = layer
                running = running[~exits]
            if running.numel() == 0:
                break
        if running.numel():
            done_ids.append(running)
            done_logits.append(self.head(self.norm(x.index_select(0, running))))
        order, logits = torch.cat(done_ids), torch.cat(done_logits)
        logits = logits.new_zeros(b * n, logits.shape[-1]).index_copy(0, order, logits)
        logits = logits.view(b, n, -1)
        exit_layer = exit_layer.view(b, n).to(x.dtype)
        stats = {"exit_layer": exit_layer, "layers_per_token": exit_layer}
        ce = loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.reshape(b * n, -1), flat_targets)
            loss = ce + self.cfg.balance_weight * balance / layers
            if exit_ce:
                loss = loss + self.exit_loss_weight * torch.stack(exit_ce).mean()
        return ModelOutput(logits, loss, ce, work, stats)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        """Next-token logits ``(B, V)`` with the same exits and carry rule as ``forward``."""
        self.check_tokens(tokens[:, None])
        self.check_settings()
        x = self.embed(tokens)
        b = x.shape[0]
        running = torch.arange(b)
        done_ids, done_logits, new_g = [], [], []
        for layer, (block, g_prev) in enumerate(zip(self.blocks, state.g, strict=True), start=1):
            xr = x.index_select(0, running)
            f, v, _ = block.token_work(xr)
            a = v.new_full((b, v.shape[-1]), H0_DIAGONAL).index_copy(0, running, H0_DIAGONAL + v)
            g = causal_step(a, H0_COUPLING * H0_COUPLING, block.shift(), g_prev)
            new_g.append(g)
            x = x.index_copy(0, running, xr + f + block.mix(g.index_select(0, running)))
            if layer in self.exit_layers() and self.exit_threshold <= 1 and running.numel():
                logits = self.head(self.exit_norms[layer - 1](x.index_select(0, running)))
                exits = torch.softmax(logits, dim=-1).amax(dim=-1) >= self.exit_threshold
                done_ids.append(running[exits])
                done_logits.append(logits[exits])
                running = running[~exits]
        if running.numel():
            done_ids.append(running)
            done_logits.append(self.head(self.norm(x.index_select(0, running))))
        order, logits = torch.cat(done_ids), torch.cat(done_logits)
        logits = logits.new_zeros(b, logits.shape[-1]).index_copy(0, order, logits)
        return logits, DecodeState(tuple(new_g), state.position + 1)


def run_block(block: BKBlock, x: torch.Tensor, running: torch.Tensor, b: int, n: int
              ) -> tuple[torch.Tensor, torch.Tensor, Work]:
    """One block on the running tokens of the flat hidden states ``x`` ``(B*N, d)``.

    ``running`` (non-empty) lists flat token indices. Exited tokens keep their hidden state and
    contribute potential 0; the recurrence runs on the sequences with a running token, up to the
    last running position.
    Returns (new x, load-balancing loss, work executed).
    """
    xr = x.index_select(0, running)
    f, v, balance = block.token_work(xr)
    seq, pos = running // n, running % n
    rows = torch.unique(seq)
    length = int(pos.max()) + 1
    slot = torch.full((b,), -1, dtype=torch.long)
    slot[rows] = torch.arange(rows.numel())
    potentials = v.new_zeros(rows.numel(), length, v.shape[-1]).index_put((slot[seq], pos), v)
    g = block.resolvent(potentials)
    x = x.index_copy(0, running, xr + f + block.mix(g[slot[seq], pos]))
    work = Work(token_layers=running.numel(), expert_calls=running.numel(),
                positions=rows.numel() * length)
    return x, balance, work
