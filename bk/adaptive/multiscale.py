"""Multi-scale ResNet-BK: inner blocks run on causally pooled, shorter sequences.

The stack is an hourglass over the dense model's blocks (causal Hourglass, Nawrot et al. 2022,
"Hierarchical Transformers Are More Efficient Language Models"; Funnel, Dai et al. 2020).
Block ``i`` runs at level ``l_i``, i.e. on ``N_l = floor(N / k^l)`` positions. With ``rise``
``last`` (the default), ``l_i = min(i, levels)`` for every block but the last, which runs at full
resolution: with ``levels=2`` and 4 blocks it is ``N -> N/2 -> N/4 -> (N/2 merge) -> N``, block 0
at N, block 1 at N/2, block 2 at N/4, block 3 at N after up-sampling. With ``rise`` ``mirror``
the stack comes back up one level per block as it went down, ``l_i = min(i, levels, n-1-i)``:
with ``levels=2`` and 6 blocks, N, N/2, N/4, N/4, N/2, N. The default, ``factor=2, levels=2``,
runs one block at N/2 and all but the first and the last at N/4 (at ``small``, fine-tuned 900
steps with distillation weight 3, +3.9% test perplexity, where ``levels=3`` cost +5.1%).

Down-sampling (level l -> l+1): pooled position ``j`` is a learned convex combination of the k
positions ``jk .. jk+k-1`` of its group, ``y_j = sum_r softmax(w)_r x_{jk+r}`` (per channel);
equal weights give mean pooling. A trailing incomplete group is dropped: it could only be used by
positions beyond the sequence (below), so any N works and nothing needs padding.

Up-sampling (level l+1 -> l): group ``j`` is complete once position ``jk+k-1`` has been read, so
position ``t`` receives the group ``floor((t+1)/k) - 1`` (none for ``t < k-1``): the causal
shift of the Hourglass decoder. What it receives is the *update* the coarse blocks made,
``gain_r * (y'_j - y_j)`` with a learned gain per offset ``r = t-(k-1) mod k`` (initially 1),
added to the fine stream it was pooled from; that full-resolution residual keeps each
position's own information. With ``k = 1`` pooling and up-sampling are the identity and the
model is the dense model (up to float rounding of ``x + (y - x)``).

Causality: a coarse block is causal over groups, group ``j`` depends on tokens ``<= jk+k-1``,
and it is read only at positions ``>= jk+k-1``; by induction over levels no position sees a
later token.

Decoding (``step``) follows the same schedule one position at a time: a level keeps the stream
values of its current incomplete group; when a position completes a group, the group is pooled
and the coarser blocks step once on it, and the update of the last completed group is kept for
the positions that read it until the next one completes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bk.model import DecodeState, ModelConfig, ModelOutput, Work
from bk.technique import Knob, KnobError, TechniqueModel

FACTOR = Knob("factor", int, 2, "pooling factor k between consecutive levels", low=1,
              grid=(2, 4), search=(2, 8))
LEVELS = Knob("levels", int, 2, "number of down-sampling levels; needs n_layers >= levels + 2",
              low=0, grid=(1, 2), search=(1, 2))
RISE = Knob("rise", str, "last", "the way back to full resolution: 'last' (the last block alone "
            "runs at N) or 'mirror' (one level per block, as on the way down; needs n_layers "
            ">= 2 levels + 1)", choices=("last", "mirror"), grid=("last", "mirror"))

# Runs block ``index`` on ``x`` at its resolution: (new x, its weighted auxiliary training terms,
# rows whose per-token work ran).
BlockRunner = Callable[[int, nn.Module, torch.Tensor],
                       tuple[torch.Tensor, dict[str, torch.Tensor], int]]


def block_levels(n_layers: int, levels: int, rise: str = "last") -> tuple[int, ...]:
    """Resolution level of each block: ``min(i, levels)`` with the last block at full resolution
    (``rise="last"``), or ``min(i, levels, n_layers - 1 - i)`` (``rise="mirror"``)."""
    if levels < 0:
        raise KnobError(f"knob levels: expected an integer >= 0, got {levels}")
    if levels > 0 and levels > n_layers - 2:
        raise KnobError(f"knob levels: levels={levels} needs at least levels + 2 = {levels + 2} "
                        f"blocks (one full-resolution block on each side); the model has "
                        f"{n_layers}")
    if rise == "mirror":
        if n_layers < 2 * levels + 1:
            raise KnobError(f"knob rise: 'mirror' with levels={levels} needs at least 2 levels "
                            f"+ 1 = {2 * levels + 1} blocks; the model has {n_layers}")
        return tuple(min(i, levels, n_layers - 1 - i) for i in range(n_layers))
    if rise != "last":
        raise KnobError(f"knob rise: expected 'last' or 'mirror', got {rise!r}")
    return tuple(min(i, levels) for i in range(n_layers - 1)) + (0,)


def pool(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Causal pooling of ``x`` ``(B, N, d)`` by groups of ``k = weights.shape[0]``.

    ``weights`` ``(k, d)`` are logits, softmax-normalised over the group; returns
    ``(B, N // k, d)``; group ``j`` summarises positions ``jk .. jk+k-1``.
    """
    b, n, d = x.shape
    k = weights.shape[0]
    groups = n // k
    grouped = x[:, :groups * k].reshape(b, groups, k, d)
    return (grouped * torch.softmax(weights, dim=0)).sum(dim=2)


def unpool(delta: torch.Tensor, gains: torch.Tensor, length: int) -> torch.Tensor:
    """Causal up-sampling of ``delta`` ``(B, G, d)`` to ``(B, length, d)``.

    Position ``t`` gets ``gains[r] * delta[floor((t+1)/k) - 1]`` with ``r = (t-(k-1)) mod k``,
    and zero for ``t < k-1``: a group is read only after its last position.
    """
    b, groups, d = delta.shape
    k = gains.shape[0]
    if not groups * k <= length < (groups + 1) * k:
        raise ValueError(f"{groups} groups of {k} do not tile a sequence of length {length}")
    spread = (delta[:, :, None, :] * gains).reshape(b, groups * k, d)
    return torch.cat([spread.new_zeros(b, k - 1, d), spread], dim=1)[:, :length]


@dataclass(frozen=True)
class HourglassDecodeState(DecodeState):
    """The dense state (per block, the resolvent at the last position *that block* ran) plus,
    per level ``l`` below the coarsest: ``partial[l]``, the level-``l`` stream values ``(B, d)``
    of the current incomplete group, and ``update[l]``, the coarse update ``(B, d)`` of the last
    completed group (``None`` before the first)."""

    partial: tuple[tuple[torch.Tensor, ...], ...] = ()
    update: tuple[torch.Tensor | None, ...] = ()


class MultiScaleLanguageModel(TechniqueModel):
    """The dense model's blocks (same names, ``blocks.{i}``) on an hourglass of resolutions;
    block ``i`` runs at level ``block_level[i]``. It makes no decisions (``forced`` is None)."""

    KNOBS = (FACTOR, LEVELS, RISE)

    def __init__(self, cfg: ModelConfig, *, factor: int = 2, levels: int = 2,
                 rise: str = "last") -> None:
        super().__init__(cfg)
        self.factor = self.knob("factor").parse(factor)
        self.levels = self.knob("levels").parse(levels)
        self.rise = self.knob("rise").parse(rise)
        self.block_level = block_levels(cfg.n_layers, self.levels, self.rise)
        depth = max(self.block_level)
        # Zero logits: mean pooling; unit gains: the coarse update passed on unchanged.
        self.pool_weights = nn.ParameterList(
            nn.Parameter(torch.zeros(self.factor, cfg.d_model)) for _ in range(depth))
        self.unpool_gains = nn.ParameterList(
            nn.Parameter(torch.ones(self.factor, cfg.d_model)) for _ in range(depth))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        return self.hourglass(idx, targets, self.run_block)

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """The dense block on ``x`` at its resolution (a :data:`BlockRunner`)."""
        x, balance = block(x)
        terms = {"balance": self.cfg.balance_weight * balance} if self.training else {}
        return x, terms, x.shape[0] * x.shape[1]

    def hourglass(self, idx: torch.Tensor, targets: torch.Tensor | None,
                  run_block: BlockRunner) -> ModelOutput:
        """The forward pass with every block run by ``run_block`` at its resolution."""
        self.check_tokens(idx)
        b, n = idx.shape
        x = self.embed(idx)
        aux: dict[str, torch.Tensor] = {}
        finer: list[tuple[torch.Tensor, torch.Tensor]] = []  # (fine stream, coarse at pooling)
        token_layers = positions = 0
        for index, (block, level) in enumerate(zip(self.blocks, self.block_level, strict=True)):
            x = self._move_to(level, x, finer)
            if x.shape[1] > 0:  # a level shorter than one group has no positions to run
                x, terms, rows = run_block(index, block, x)
                for name, term in terms.items():
                    aux[name] = aux.get(name, 0) + term
                token_layers += rows
                positions += b * x.shape[1]
        x = self._move_to(0, x, finer)
        layers = len(self.blocks)
        work = Work(token_layers=token_layers, expert_calls=token_layers, positions=positions)
        stats = {"layers_per_token": x.new_full((b, n), token_layers / (b * n))}
        aux = {name: term / layers for name, term in aux.items()}
        return self.finish(x, targets, aux, work, stats)

    def _move_to(self, level: int, x: torch.Tensor,
                 finer: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Pool down or merge up from the current level (``len(finer)``) to ``level``."""
        while len(finer) < level:
            coarse = pool(x, self.pool_weights[len(finer)])
            finer.append((x, coarse))
            x = coarse
        while len(finer) > level:
            fine, pooled = finer.pop()
            x = fine + unpool(x - pooled, self.unpool_gains[len(finer)], fine.shape[1])
        return x

    def init_state(self, batch_size: int) -> HourglassDecodeState:
        depth = len(self.pool_weights)
        return HourglassDecodeState(g=super().init_state(batch_size).g,
                                    partial=((),) * depth, update=(None,) * depth)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, HourglassDecodeState]:
        if not isinstance(state, HourglassDecodeState):
            raise TypeError(f"state must be a HourglassDecodeState from init_state, got "
                            f"{type(state).__name__}")
        self.check_tokens(tokens[:, None])
        x = self.embed(tokens)
        g, partial, update = list(state.g), list(state.partial), list(state.update)
        finer: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        for index, (block, level) in enumerate(zip(self.blocks, self.block_level, strict=True)):
            x = self._step_to(level, x, finer, partial, update)
            if x is not None:  # this position completed a group at the block's level
                x, g[index] = block.step(x, g[index])
        x = self._step_to(0, x, finer, partial, update)
        return self.head(self.norm(x)), HourglassDecodeState(
            tuple(g), state.position + 1, tuple(partial), tuple(update))

    def _step_to(self, level: int, x: torch.Tensor | None,
                 finer: list[tuple[torch.Tensor | None, torch.Tensor | None]],
                 partial: list[tuple[torch.Tensor, ...]], update: list[torch.Tensor | None]
                 ) -> torch.Tensor | None:
        """``_move_to`` for one new position: ``x`` is ``None`` at a level where it completed
        no group (nothing runs there). Updates ``partial`` and ``update`` in place."""
        while len(finer) < level:
            fine_level = len(finer)
            pooled = None
            if x is not None:
                group = (*partial[fine_level], x)
                complete = len(group) == self.factor
                if complete:
                    stacked = torch.stack(group, dim=1)
                    pooled = pool(stacked, self.pool_weights[fine_level])[:, 0]
                partial[fine_level] = () if complete else group
            finer.append((x, pooled))
            x = pooled
        while len(finer) > level:
            fine, pooled = finer.pop()
            fine_level = len(finer)
            if fine is None:
                x = None
                continue
            if pooled is not None:  # the group completed here: its update is read at offset 0
                update[fine_level] = x - pooled
            # The gain's offset r = (t - (k-1)) mod k: 0 where the group completed, else the
            # number of positions of the incomplete group so far.
            offset = len(partial[fine_level])
            last = update[fine_level]
            x = fine if last is None else fine + self.unpool_gains[fine_level][offset] * last
        return x
