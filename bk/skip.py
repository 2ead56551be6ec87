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
  row 0 and is never written back, so it never changes a result (nor the MoE balance loss).

:func:`run_block` runs a ResNet-BK block on a subset of a sequence's tokens; :func:`step_block`
is the same for one position, for state-cached decoding. Like the dense block's combine
(bk/moe.py), they write their result in one pass over the rows (numba kernels, below): each row
that ran gets ``x + f + mix``, the others ``x`` (or ``x + mix``), with no scatter, add or copy
of ``x`` on the side.

Invariants (tests/test_skip.py): where a row runs, the result equals the dense computation of
that row; elsewhere the input passes through unchanged; gradients reach the work only through the
rows that ran; stepping positions with ``step_block`` computes what ``run_block`` computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from numba import njit
from torch import nn

from bk.core import causal_step
from bk.model import H0_COUPLING, H0_DIAGONAL
from bk.moe import _JIT, _array


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
        index = torch.empty(b * k, dtype=torch.int64)
        valid = torch.empty(b * k, dtype=torch.bool)
        _first_selected(_array(select), k, index.numpy(), valid.numpy())
        return cls(index, b * n, valid)

    @property
    def size(self) -> int:
        """Entries gathered (rows that run, plus padding for a capacity subset)."""
        return self.index.numel()

    @property
    def every_row(self) -> bool:
        """Whether every row runs (then ``index`` is ``0, 1, ..., total - 1``)."""
        return self.valid is None and self.size == self.total

    @cached_property
    def entry(self) -> torch.Tensor:
        """``(total,)`` int64: the entry (position in ``index``) of each row that runs, -1 for
        the other rows."""
        entry = torch.empty(self.total, dtype=torch.int64)
        _entries(_array(self.index), entry.numpy())
        return entry

    @cached_property
    def read_index(self) -> torch.Tensor:
        """``(K,)`` int64: the row each entry reads (``index``, with padding reading row 0)."""
        return self.index if self.valid is None else torch.where(self.valid, self.index, 0)

    def mask(self) -> torch.Tensor:
        """``(total,)`` bool: the rows that run."""
        return self.entry >= 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` ``(total, ...)`` that run (padding reads row 0); ``x`` itself
        when every row runs."""
        self._check(x, "x")
        return x if self.every_row else x.index_select(0, self.read_index)

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
        if self.every_row:
            return base + rows if accumulate else rows.to(base.dtype)
        if self.valid is None:
            return (base.index_add(0, self.index, rows) if accumulate
                    else base.index_copy(0, self.index, rows))
        # One copy of base, followed by the scratch row that the padding entries write to
        out = base.new_empty(self.total + 1, *base.shape[1:])
        out[:self.total] = base
        written = (out.index_add_(0, self.index, rows) if accumulate
                   else out.index_copy_(0, self.index, rows))
        return written[:self.total]

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.shape[0] != self.total:
            raise ValueError(f"{name} must have {self.total} rows (the subset's total), got "
                             f"shape {tuple(x.shape)}")


def carry_previous(values: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, N, C)`` at the last position strictly before each position where ``ran``
    ``(B, N)`` is true, 0 where there is none: a causal fill for skipped positions."""
    b, n, c = values.shape
    entry = torch.where(ran.reshape(-1), torch.arange(b * n, device=ran.device), -1)
    _, _, before = _sources(entry, n, carry=True, none=b * n)
    return _Take.apply(values.reshape(b * n, c), before).view(b, n, c)


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

    The per-token work is ``block.token_work(rows)``; for a capacity subset
    ``block.token_work(rows, valid=subset.valid)``, so that the balance loss leaves out the
    padding rows. A subset of every row (no gate, no scale) runs the block itself,
    ``block(x)``.
    """
    if fill not in ("zero", "carry") or readout not in ("ran", "all"):
        raise ValueError(f"fill must be 'zero' or 'carry' and readout 'ran' or 'all', got "
                         f"{fill!r}, {readout!r}")
    if scale is not None and readout != "ran":
        raise ValueError("scale multiplies the update of the rows that ran: it needs readout "
                         "'ran'")
    if subset.every_row and gate is None and scale is None:
        return block(x)  # nothing skipped: the dense block, fused
    b, n, d = x.shape
    flat = x.reshape(b * n, d)
    f, v, balance = _token_work(block, flat, subset)
    if gate is not None:
        f = f * gate[:, None]
    potentials = _potentials(subset, v, n, fill, gate)
    g_diag = block.resolvent(potentials.view(b, n, -1)).reshape(b * n, -1)
    if readout == "all":
        mixed = block.mix(g_diag)
        if mixed._is_view() or not mixed.is_contiguous():
            mixed = mixed.clone(memory_format=torch.contiguous_format)  # written in place
        out = _PlaceAll.apply(mixed, flat, f, subset)
    else:
        out = _PlaceRan.apply(flat, f, block.mix(subset.gather(g_diag)), scale, subset)
    return out.view(b, n, d), balance


def step_block(block: nn.Module, x: torch.Tensor, subset: Subset, g_prev: torch.Tensor | None,
               *, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of :func:`run_block` (``fill="zero"``, ``readout="ran"``) for state-cached
    decoding: ``x`` ``(B, d)`` holds one position of every sequence and ``subset`` its rows that
    run. The recurrence advances for every row, with potential 0 where the row does not run, so
    stepping positions in order computes what ``run_block`` computes on the whole sequence.
    Returns (new x, this position's resolvent value ``(B, C)``, the state for the next one)."""
    f, v, _ = _token_work(block, x, subset)
    potentials = _potentials(subset, v, 1, "zero", None)
    g = causal_step(H0_DIAGONAL + potentials, H0_COUPLING * H0_COUPLING, block.shift(), g_prev)
    return _PlaceRan.apply(x, f, block.mix(subset.gather(g)), scale, subset), g


def _token_work(block: nn.Module, flat: torch.Tensor, subset: Subset
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = subset.gather(flat)
    if subset.valid is None:
        return block.token_work(rows)
    return block.token_work(rows, valid=subset.valid)


def _potentials(subset: Subset, v: torch.Tensor, n: int, fill: str,
                gate: torch.Tensor | None) -> torch.Tensor:
    """``(total, C)``: the potential of every row in sequences of ``n`` rows: ``v`` ``(K, C)``
    where the row ran, the fill elsewhere; with ``gate``, ``gate v + (1 - gate) fill`` where it
    ran."""
    own, source, before = _sources(subset.entry, n, carry=fill == "carry", none=subset.size)
    if gate is None:
        return _Take.apply(v, source)
    g = _Take.apply(gate[:, None], own)
    return g * _Take.apply(v, own) + (1 - g) * _Take.apply(v, before)


def _sources(entry: torch.Tensor, n: int, carry: bool, none: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For flat rows in sequences of ``n`` whose entries are ``entry`` (-1: the row did not
    run), the entry each row takes (``none``: nothing, a zero) for: its own value, its value
    with the fill where it did not run, and the fill alone (with ``carry`` the entry of the last
    row before it in its sequence that ran, else nothing)."""
    own, source, before = (torch.empty_like(entry) for _ in range(3))
    _fill_sources(_array(entry), max(n, 1), carry, none, own.numpy(), source.numpy(),
                  before.numpy())
    return own, source, before


# --------------------------------------------------------------------------------------------
# Kernels (C-contiguous arrays) and their autograd functions
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _first_selected(select, k, index, valid):
    """Per row of ``select`` ``(B, N)``: the flat indices of its first ``k`` true positions,
    then padding (index ``B * N``, not valid) up to ``k`` entries."""
    b, n = select.shape
    for row in range(b):
        taken = 0
        for i in range(n):
            if taken == k:
                break
            if select[row, i]:
                index[row * k + taken] = row * n + i
                valid[row * k + taken] = True
                taken += 1
        for j in range(row * k + taken, (row + 1) * k):
            index[j] = b * n
            valid[j] = False


@njit(**_JIT)
def _entries(index, entry):
    """``entry[index[t]] = t`` for every ``index[t]`` inside ``entry``; -1 elsewhere."""
    entry[:] = -1
    for t in range(index.shape[0]):
        if index[t] < entry.shape[0]:
            entry[index[t]] = t


@njit(**_JIT)
def _fill_sources(entry, n, carry, none, own, source, before):
    for start in range(0, entry.shape[0], n):
        last = none
        for r in range(start, start + n):
            t = entry[r]
            before[r] = last
            own[r] = t if t >= 0 else none
            source[r] = t if t >= 0 else last
            if t >= 0 and carry:
                last = t


@njit(**_JIT)
def _take(values, source, out):
    """``out[r] = values[source[r]]``, or 0 where ``source[r]`` is past the last row."""
    for r in range(source.shape[0]):
        s = source[r]
        if s < values.shape[0]:
            for j in range(out.shape[1]):
                out[r, j] = values[s, j]
        else:
            for j in range(out.shape[1]):
                out[r, j] = 0.0


@njit(**_JIT)
def _place_all(entry, x, f, out):
    """``out[r] += x[r] + f[entry[r]]`` where ``entry[r] >= 0``, else ``out[r] += x[r]``. (With
    ``out = m``, ``m + (x + f)`` is the dense combine's ``x + f + m`` exactly.)"""
    for r in range(out.shape[0]):
        t = entry[r]
        if t >= 0:
            for j in range(out.shape[1]):
                out[r, j] += x[r, j] + f[t, j]
        else:
            for j in range(out.shape[1]):
                out[r, j] += x[r, j]


@njit(**_JIT)
def _place_ran(entry, x, f, m, scale, out):
    """``out[r] = x[r] + (f[t] + m[t]) * scale[t]`` for ``t = entry[r] >= 0``, or without a
    factor (``scale`` empty) ``m[t] + (x[r] + f[t])`` as the dense combine sums it; else
    ``out[r] = x[r]``."""
    scaled = scale.shape[0] > 0
    for r in range(out.shape[0]):
        t = entry[r]
        if t < 0:
            for j in range(out.shape[1]):
                out[r, j] = x[r, j]
        elif scaled:
            s = scale[t]
            for j in range(out.shape[1]):
                out[r, j] = x[r, j] + (f[t, j] + m[t, j]) * s
        else:
            for j in range(out.shape[1]):
                out[r, j] = m[t, j] + (x[r, j] + f[t, j])


def _rows_of(t: torch.Tensor) -> np.ndarray:
    """``t`` as a 2-D array of its rows."""
    return _array(t).reshape(t.shape[0], math.prod(t.shape[1:]))


def _ran_rows(grad: torch.Tensor, subset: Subset) -> torch.Tensor:
    """The rows of ``grad`` ``(total, ...)`` that ran, one per entry; 0 for padding."""
    rows = subset.gather(grad)
    if subset.valid is None:
        return rows
    return torch.where(subset.valid.view(-1, *(1,) * (rows.dim() - 1)), rows, 0)


class _Take(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, source):
        out = values.new_empty(source.shape[0], *values.shape[1:])
        _take(_rows_of(values), _array(source), _rows_of(out))
        ctx.save_for_backward(source)
        ctx.rows = values.shape[0]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (source,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.rows + 1, *grad.shape[1:]).index_add_(0, source, grad)
        return full[:ctx.rows], None


class _PlaceAll(torch.autograd.Function):
    """``m + (x + f)`` where a row ran, ``m + x`` elsewhere, in place of ``m``."""

    @staticmethod
    def forward(ctx, mixed, x, f, subset):
        ctx.mark_dirty(mixed)
        _place_all(_array(subset.entry), _array(x), _array(f), mixed.detach().numpy())
        ctx.subset = subset
        return mixed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad, grad, _ran_rows(grad, ctx.subset), None


class _PlaceRan(torch.autograd.Function):
    """``x + (f + m) * scale`` (or ``x + f + m``) where a row ran, ``x`` elsewhere."""

    @staticmethod
    def forward(ctx, x, f, m, scale, subset):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _place_ran(_array(subset.entry), _array(x), _array(f), _array(m),
                   _array(scale if scale is not None else x.new_empty(0)), out.numpy())
        ctx.save_for_backward(f, m, scale)
        ctx.subset = subset
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        f, m, scale = ctx.saved_tensors
        rows = _ran_rows(grad, ctx.subset)
        grad_update = rows if scale is None else rows * scale[:, None]
        grad_scale = (rows * (f + m)).sum(dim=1) if ctx.needs_input_grad[3] else None
        return grad, grad_update, grad_update, grad_scale, None
