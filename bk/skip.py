"""The one skip primitive: run per-token work on a subset of tokens and put the results back.

Every technique that skips work for some tokens (halting, early exit, per-position sparsity,
capacity routing, conditional experts) selects a :class:`Subset` of the rows of a flat
``(T, ...)`` token tensor, runs its work on ``subset.gather(x)`` only (a smaller tensor: the
skipped rows really do not run) and writes the results back with ``subset.scatter`` or
``subset.add``. Token order is restored by construction: results go back to the rows they came
from.

Two kinds of subsets:

* :meth:`Subset.where` takes exactly the rows of a boolean mask: a data-dependent number of rows
  (one host synchronisation to size the gather), for per-token decisions.
* :meth:`Subset.capacity` takes, in every row of a ``(B, N)`` decision mask, the first ``k``
  selected positions in position order: a static ``B * k`` rows, no host synchronisation, as in
  capacity-based routing (Mixture-of-Depths, Raposo et al. 2024). Taking the *first* ``k`` keeps
  the choice causal (whether position ``i`` runs depends on the decisions at positions ``<= i``
  only); rows of a sequence with fewer than ``k`` selected positions are padding, which gathers
  row 0 and is written to a scratch row that is dropped, so it never changes a result.

:func:`run_block` runs a ResNet-BK block on a subset of a sequence's tokens; :func:`step_block`
is the same for one position, for state-cached decoding.

Invariants (tests/test_skip.py): where a row runs, the result equals the dense computation of
that row; elsewhere the input passes through unchanged; gradients reach the work only through the
rows that ran; stepping positions with ``step_block`` computes what ``run_block`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bk.core import causal_step
from bk.model import H0_COUPLING, H0_DIAGONAL


@dataclass(frozen=True)
class Subset:
    """Rows ``index`` of a flat set of ``total`` rows; ``valid`` marks padding (capacity only).

    ``index`` ``(K,)`` int64 is strictly increasing over the valid entries; padding entries
    point at row ``total`` (a scratch row) and are ignored by :meth:`scatter` and :meth:`add`.
    """

    index: torch.Tensor
    total: int
    valid: torch.Tensor | None = None  # (K,) bool; None: every entry is a real row

    @classmethod
    def all(cls, total: int) -> Subset:
        return cls(torch.arange(total), total)

    @classmethod
    def where(cls, mask: torch.Tensor) -> Subset:
        """The rows where the flat boolean ``mask`` ``(T,)`` is true."""
        if mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError(f"mask must be a 1-D bool tensor, got {mask.dtype} of shape "
                             f"{tuple(mask.shape)}")
        return cls(mask.nonzero().squeeze(1), mask.numel())

    @classmethod
    def capacity(cls, select: torch.Tensor, k: int) -> Subset:
        """At most ``k`` rows per sequence: the first ``k`` positions where ``select``
        ``(B, N)`` is true, in position order; ``B * k`` entries, static in shape."""
        if select.dtype != torch.bool or select.dim() != 2:
            raise ValueError(f"select must be a (batch, positions) bool tensor, got "
                             f"{select.dtype} of shape {tuple(select.shape)}")
        b, n = select.shape
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise ValueError(f"capacity k must be an integer in [0, {n}], got {k!r}")
        positions = torch.arange(n, device=select.device)
        # Selected positions sort first, in order; the rest after them (key >= n).
        key = torch.where(select, positions, positions + n)
        first = key.sort(dim=1).values[:, :k]  # (B, k)
        valid = first < n
        flat = first + torch.arange(b, device=select.device)[:, None] * n
        index = torch.where(valid, flat, b * n)
        return cls(index.reshape(-1), b * n, valid.reshape(-1))

    @property
    def size(self) -> int:
        """Entries gathered (rows that run, plus padding for a capacity subset)."""
        return self.index.numel()

    def mask(self) -> torch.Tensor:
        """``(total,)`` bool: the rows that run."""
        out = torch.zeros(self.total + 1, dtype=torch.bool, device=self.index.device)
        out[self.index] = True if self.valid is None else self.valid
        return out[:self.total]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` ``(total, ...)`` that run (padding reads row 0)."""
        self._check(x, "x")
        index = self.index if self.valid is None else self.index.clamp(max=self.total - 1)
        return x.index_select(0, index) if self.total else x[:0]

    def scatter(self, base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``base`` with the rows that ran replaced by ``rows`` ``(K, ...)``."""
        return self._write(base, rows, accumulate=False)

    def add(self, base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``base`` with ``rows`` ``(K, ...)`` added to the rows that ran."""
        return self._write(base, rows, accumulate=True)

    def _write(self, base: torch.Tensor, rows: torch.Tensor, accumulate: bool) -> torch.Tensor:
        self._check(base, "base")
        if rows.shape != (self.size, *base.shape[1:]):
            raise ValueError(f"rows must have shape {(self.size, *base.shape[1:])}, got "
                             f"{tuple(rows.shape)}")
        if self.valid is None:
            return (base.index_add(0, self.index, rows) if accumulate
                    else base.index_copy(0, self.index, rows))
        scratch = torch.cat([base, base.new_zeros(1, *base.shape[1:])])
        written = (scratch.index_add(0, self.index, rows) if accumulate
                   else scratch.index_copy(0, self.index, rows))
        return written[:self.total]

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.shape[0] != self.total:
            raise ValueError(f"{name} must have {self.total} rows (the subset's total), got "
                             f"shape {tuple(x.shape)}")


def carry_previous(values: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, N, C)`` at the last position strictly before each position where ``ran``
    ``(B, N)`` is true, 0 where there is none: a causal fill for skipped positions."""
    b, n, c = values.shape
    positions = torch.arange(n, device=values.device).expand(b, n)
    last = torch.where(ran, positions, -1).cummax(dim=1).values  # last ran position <= i
    before = torch.cat([last.new_full((b, 1), -1), last[:, :-1]], dim=1)
    carried = values.gather(1, before.clamp(min=0)[..., None].expand(b, n, c))
    return torch.where((before >= 0)[..., None], carried, torch.zeros_like(carried))


def run_block(block: nn.Module, x: torch.Tensor, subset: Subset, *, fill: str = "zero",
              readout: str = "ran", gate: torch.Tensor | None = None,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ResNet-BK block (``bk.model.BKBlock``) on ``x`` ``(B, N, d)`` whose per-token work
    (norm, mixture of experts, potential) runs only on the rows of ``subset`` (flat ``B * N``).

    The BK recurrence visits every position; at a skipped position the potential is ``fill``:
    ``"zero"`` (the bare Laplacian H0, bk/model.py) or ``"carry"`` (the potential of the last
    position before it that ran, :func:`carry_previous`). ``readout`` says where the resolvent
    read-out is added to the residual stream: ``"ran"`` (skipped rows pass through unchanged) or
    ``"all"``. ``gate`` ``(subset.size,)``, 1 in value on real rows, multiplies their feed-forward
    output and mixes their potential with the fill (``gate v + (1 - gate) fill``): the path of a
    straight-through decision gradient. ``scale`` ``(subset.size,)`` multiplies the whole update
    (feed-forward plus read-out) of each row that ran, as in Mixture-of-Depths' ``x + r f(x)``
    (readout ``"ran"`` only). Returns (new x, the MoE balance loss of the rows that ran).
    """
    if fill not in ("zero", "carry") or readout not in ("ran", "all"):
        raise ValueError(f"fill must be 'zero' or 'carry' and readout 'ran' or 'all', got "
                         f"{fill!r}, {readout!r}")
    if scale is not None and readout != "ran":
        raise ValueError("scale multiplies the update of the rows that ran: it needs readout "
                         "'ran'")
    b, n, d = x.shape
    flat = x.reshape(b * n, d)
    f, v, balance = block.token_work(subset.gather(flat))
    channels = v.shape[-1]
    potentials = subset.scatter(v.new_zeros(b * n, channels), v).view(b, n, channels)
    if fill == "carry" or gate is not None:
        ran = subset.mask().view(b, n)
        fill_v = (carry_previous(potentials, ran) if fill == "carry"
                  else torch.zeros_like(potentials))
        if gate is None:
            potentials = torch.where(ran[..., None], potentials, fill_v)
        else:
            g = subset.scatter(gate.new_zeros(b * n), gate).view(b, n, 1)
            potentials = g * potentials + (1 - g) * fill_v
    if gate is not None:
        f = f * gate[:, None]
    g_diag = block.resolvent(potentials)
    if readout == "all":
        out = subset.add(flat, f) + block.mix(g_diag).reshape(b * n, d)
    else:
        rows = subset.gather(g_diag.reshape(b * n, channels))
        out = subset.add(flat, _scaled(f + block.mix(rows), scale))
    return out.view(b, n, d), balance


def step_block(block: nn.Module, x: torch.Tensor, subset: Subset, g_prev: torch.Tensor | None,
               *, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of :func:`run_block` (``fill="zero"``, ``readout="ran"``) for state-cached
    decoding: ``x`` ``(B, d)`` holds one position of every sequence and ``subset`` its rows that
    run. The recurrence advances for every row, with potential 0 where the row does not run, so
    stepping positions in order computes what ``run_block`` computes on the whole sequence.
    Returns (new x, this position's resolvent value ``(B, C)``, the state for the next one)."""
    f, v, _ = block.token_work(subset.gather(x))
    potentials = subset.scatter(v.new_zeros(x.shape[0], v.shape[-1]), v)
    g = causal_step(H0_DIAGONAL + potentials, H0_COUPLING * H0_COUPLING, block.shift(), g_prev)
    return subset.add(x, _scaled(f + block.mix(subset.gather(g)), scale)), g


def _scaled(update: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return update if scale is None else update * scale[:, None]
