"""Early exit: a token stops after the first layer whose own prediction is confident enough.

After layer ``l`` (``min_exit_layer <= l < n_layers``) a token's exit logits are
``head(exit_norms[l-1](x))``: the shared LM head behind a per-layer LayerNorm. The token exits
when its exit confidence, the largest softmax probability of those logits, is at least
``exit_threshold``; its output logits are then that layer's exit logits. Tokens that never exit
use the final norm and head after layer ``n_layers``.

Carry rule (the same in training, inference and ``step``). Once a token has exited:

* none of its per-token work runs in later layers (norm, experts, potential, readout, exit
  heads): each layer runs through :func:`bk.skip.run_block` on the running tokens only
  (``fill="zero"``, ``readout="ran"``);
* its hidden state is carried unchanged (it is no longer read: its logits are fixed);
* its potential is held at 0 in later layers, so at its position the BK recurrence
  (bk/core.py eq. (1)) passes through the bare Laplacian H0: ``a_i = -2``. Tokens after it still
  see a well-defined causal prefix.

A layer's recurrence visits every position of the batch as long as one token runs the layer; a
layer that no token runs is skipped entirely (``step`` still advances its recurrence, with
potential 0, for the positions after).

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

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from bk.adaptive.depth import forced_copy, forced_depths
from bk.model import DecodeState, ModelConfig, ModelOutput, Work
from bk.skip import Subset, run_block, step_block
from bk.technique import Forcing, Knob, KnobError, TechniqueModel


@dataclass
class Exits:
    """Exit bookkeeping of flat tokens ``(T,)`` while they run the layers."""

    running: torch.Tensor  # (T,) bool, not exited yet
    exit_layer: torch.Tensor  # (T,) int64, n_layers until the token exits
    logits: torch.Tensor  # (T, V) the latest exit logits; final once the token has exited

    @classmethod
    def start(cls, x: torch.Tensor, n_layers: int, vocab_size: int) -> Exits:
        t = x.shape[0]
        return cls(torch.ones(t, dtype=torch.bool, device=x.device),
                   torch.full((t,), n_layers, dtype=torch.int64, device=x.device),
                   x.new_zeros(t, vocab_size))


class EarlyExitLanguageModel(TechniqueModel):
    """The ResNet-BK language model with confidence-based early exit per token.

    Parameters shared with :class:`LanguageModel` keep its names; the exit norms are new
    (``exit_norms.{l-1}`` serves the exit after layer ``l``). The training objective adds
    ``exit_loss_weight`` times the mean, over exit layers, of the cross-entropy of the exit
    logits of the tokens that reached that layer, so every exit head is trained.

    Forcing (the ceiling, :meth:`forced`): the skippable unit is a token-layer. The forced model
    computes no exit confidence; token ``t`` exits after ``D_t`` layers (:func:`bk.adaptive.
    depth.forced_depths`: ``"uniform"``, every token the same depth ``keep * L`` rounded to whole
    layers; ``"per_token"``, a random depth per token with mean ``keep * L``), whatever
    ``min_exit_layer``. Its output logits are those of its exit head at ``D_t``
    (the final head for ``D_t = L``), computed for the tokens that leave there only.
    """

    KNOBS: ClassVar[tuple[Knob, ...]] = (
        Knob("exit_threshold", float, 0.9, "exit when the max softmax probability of a layer's "
             "prediction reaches this (above 1: never)", low=0.0, grid=(0.7, 0.8, 0.9, 0.95),
             search=(0.5, 0.99)),
        Knob("min_exit_layer", int, 1, "earliest layer after which a token may exit (at most "
             "n_layers)", low=1, grid=(1, 2)),
        Knob("exit_loss_weight", float, 1.0, "weight of the exit heads' mean cross-entropy in "
             "the training loss", low=0.0),
    )

    def __init__(self, cfg: ModelConfig, *, exit_threshold: float = 0.9,
                 min_exit_layer: int = 1, exit_loss_weight: float = 1.0) -> None:
        super().__init__(cfg)
        self.exit_norms = nn.ModuleList(nn.LayerNorm(cfg.d_model)
                                        for _ in range(cfg.n_layers - 1))
        self.exit_threshold = exit_threshold
        self.min_exit_layer = min_exit_layer
        self.exit_loss_weight = exit_loss_weight
        self.forcing: Forcing | None = None
        self.check_settings()

    def check_settings(self) -> None:
        """Every knob valid (also after an attribute was set by hand)."""
        for knob in self.KNOBS:
            setattr(self, knob.name, knob.parse(getattr(self, knob.name)))
        if self.min_exit_layer > self.cfg.n_layers:
            raise KnobError(f"knob min_exit_layer: expected an integer in [1, n_layers="
                            f"{self.cfg.n_layers}], got {self.min_exit_layer!r}")

    def forced(self, forcing: Forcing) -> EarlyExitLanguageModel:
        return forced_copy(self, forcing)

    def exit_layers(self) -> range:
        """Layers after which a token may exit early (the last layer always ends the model)."""
        return range(self.min_exit_layer, self.cfg.n_layers)

    def exit_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.exit_norms[layer - 1](x))

    def exit(self, layer: int, subset: Subset, logits: torch.Tensor, exits: Exits) -> Exits:
        """The running tokens ``subset`` whose exit ``logits`` after ``layer`` are confident
        enough exit; the others keep running (their logits are overwritten later)."""
        leaves = torch.softmax(logits.detach(), dim=-1).amax(dim=-1) >= self.exit_threshold
        return Exits(subset.scatter(exits.running, ~leaves),
                     subset.scatter(exits.exit_layer,
                                    torch.where(leaves, layer, self.cfg.n_layers)),
                     subset.scatter(exits.logits, logits))

    def forced_exit(self, layer: int, x: torch.Tensor, exits: Exits, depths: torch.Tensor
                    ) -> Exits:
        """The running tokens whose forced depth is ``layer`` exit, with their exit logits."""
        leaving = Subset.where(exits.running & (depths == layer))
        return Exits(leaving.scatter(exits.running, exits.running.new_zeros(leaving.size)),
                     leaving.scatter(exits.exit_layer, depths.new_full((leaving.size,), layer)),
                     leaving.scatter(exits.logits, self.exit_logits(layer, leaving.gather(x))))

    def finish_exits(self, x: torch.Tensor, exits: Exits) -> torch.Tensor:
        """Output logits ``(T, V)``: the tokens still running take the final norm and head."""
        last = Subset.where(exits.running)
        return last.scatter(exits.logits, self.head(self.norm(last.gather(x))))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        self.check_settings()
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)}")
        b, n = idx.shape
        x = self.embed(idx)
        exits = Exits.start(x.view(b * n, -1), self.cfg.n_layers, self.cfg.vocab_size)
        depths = (None if self.forcing is None
                  else forced_depths(self.forcing, self.cfg.n_layers, b * n).to(x.device))
        flat_targets = targets.reshape(-1) if targets is not None else None
        exit_ce = []
        balance = x.new_zeros(())
        work = Work()
        # Confidence never exceeds 1, so above 1 the exit heads cannot change anything and are
        # not computed, except in training where they are trained.
        may_exit = self.training or self.exit_threshold <= 1
        for layer, block in enumerate(self.blocks, start=1):
            subset = Subset.where(exits.running)
            if subset.size == 0:
                break
            x, layer_balance = run_block(block, x, subset, fill="zero", readout="ran")
            balance = balance + layer_balance
            work = work + Work(token_layers=subset.size, expert_calls=subset.size,
                               positions=b * n)
            flat = x.view(b * n, -1)
            if depths is not None and layer < self.cfg.n_layers:
                exits = self.forced_exit(layer, flat, exits, depths)
            elif depths is None and layer in self.exit_layers() and may_exit:
                logits = self.exit_logits(layer, subset.gather(flat))
                if self.training and flat_targets is not None:
                    exit_ce.append(F.cross_entropy(logits, subset.gather(flat_targets)))
                exits = self.exit(layer, subset, logits, exits)
        logits = self.finish_exits(x.view(b * n, -1), exits).view(b, n, -1)
        exit_layer = exits.exit_layer.view(b, n).to(x.dtype)
        aux = {}
        if self.training:
            aux["balance"] = self.cfg.balance_weight * balance / self.cfg.n_layers
            if exit_ce:
                aux["exit"] = self.exit_loss_weight * torch.stack(exit_ce).mean()
        stats = {"exit_layer": exit_layer, "layers_per_token": exit_layer}
        return self.output(logits, targets, aux, work, stats)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        """Next-token logits ``(B, V)`` with the same exits and carry rule as ``forward``."""
        if not self.DECODES:
            return super().step(tokens, state)  # raises, saying why
        self.check_tokens(tokens[:, None])
        self.check_settings()
        x = self.embed(tokens)
        exits = Exits.start(x, self.cfg.n_layers, self.cfg.vocab_size)
        new_g = []
        for layer, (block, g_prev) in enumerate(zip(self.blocks, state.g, strict=True), start=1):
            subset = Subset.where(exits.running)
            x, g = step_block(block, x, subset, g_prev)
            new_g.append(g)
            if layer in self.exit_layers() and self.exit_threshold <= 1:
                exits = self.exit(layer, subset, self.exit_logits(layer, subset.gather(x)), exits)
        return self.finish_exits(x, exits), DecodeState(tuple(new_g), state.position + 1)
