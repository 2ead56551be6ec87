"""Diagonal of the resolvent of a tridiagonal matrix, in O(N), with an O(N) exact adjoint.

For the tridiagonal T with T[i,i] = a_i, T[i,i+1] = b_i, T[i+1,i] = c_i and a shift z with
Im z > 0, write M = T - zI. Eliminating the leading block of M by a Schur complement gives the
continuant-ratio recursion for the last diagonal entry of the inverse of each leading block

    (1)  g_0 = 1 / (a_0 - z),      g_i = 1 / (a_i - z - b_{i-1} c_{i-1} g_{i-1}),

and, symmetrically, for the first diagonal entry of the inverse of each trailing block

    (2)  r_{N-1} = 1 / (a_{N-1} - z),      r_i = 1 / (a_i - z - b_i c_i r_{i+1}).

Eliminating both the leading and the trailing block around position i gives the full diagonal

    (3)  G_ii = [M^-1]_ii = 1 / (a_i - z - b_{i-1} c_{i-1} g_{i-1} - b_i c_i r_{i+1}).

The causal ("language-model") variant returns g_i of (1): the i-th diagonal entry of the inverse
of the leading (i+1) x (i+1) block of M, which depends on a[:i+1], b[:i], c[:i] only.

Only the products b_k c_k enter. The recursions carry ratios of consecutive continuants rather
than the continuants (determinants) themselves, so they do not overflow at large N. When
b_k c_k >= 0 and Im z > 0, every denominator has imaginary part <= -Im z, so |g_i| <= 1/Im z.
When some b_k c_k < 0 a leading or trailing block can be singular; the result is then
non-finite and a FloatingPointError is raised.

Everything is computed in double precision (also for float32 inputs) by numba kernels; the
backward pass is reverse-mode differentiation through (1)-(3), with torch's convention for complex
gradients (grad_u = conj(f'(u)) * grad_w, real part for the real inputs a, b, c).
"""

from __future__ import annotations

import cmath
import functools
import math
import struct
import threading
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

__all__ = ["causal_step", "resolvent_diag", "resolvent_diag_loop"]

_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}

# --------------------------------------------------------------------------------------------
# Layout. The recursions run on "columns": C-contiguous float64 arrays (N, rows) with one column
# per row of the batch and real and imaginary parts in separate arrays, so that the innermost
# loop runs over rows: the independent recursions of the rows sit in SIMD lanes and every access
# is contiguous (one recursion alone is latency-bound). Inputs and outputs are read and written
# in place as (P, M, Q) arrays over M = N (or N-1) positions, row p*Q + q: a (rows, N) batch is
# (rows, N, 1); the model's potentials, stored (B, N, C) and passed as the transposed view
# (B, C, N), are (B, N, C). The copies between the two layouts go in tiles of 8 positions
# (longer strides of a power-of-two size would map every row to the same few cache sets). Their
# innermost loop runs over the Q rows stored side by side, a few channels: a trip count known
# only at run time costs it about twice the time, so the kernels take Q as the length of a tuple
# (`width`), a constant of each compiled kernel, for the counts in _WIDTHS (one compilation per
# count), and read it from the array's shape otherwise (width None).
#
# A forward workspace `cols` (4 or 8, N, rows) holds the columns of a, b*c and the result (re,
# im), and for the full diagonal also (1) (re, im) and (2) (re, im); the backward pass reads it.
# --------------------------------------------------------------------------------------------

_TILE = 8
_WIDTHS = {q: (0,) * q for q in (1, 2, 4, 8, 16)}
_A, _BC, _GR, _GI, _LR, _LI, _RR, _RI = range(8)


@njit(inline="always")
def _width(x, width):
    """Q of a (P, M, Q) array: len(width), a compile-time constant, unless width is None."""
    if width is None:
        return x.shape[2]
    return len(width)


@njit(inline="always")
def _tile(copy, x, y, i0, m, out, width):
    """copy(x, y, i0, m, out, width), one of the layout copies below, for the tile of m
    positions at i0: a full tile with the constant trip count _TILE, which the compiler unrolls."""
    if m == _TILE:
        copy(x, y, i0, _TILE, out, width)
    else:
        copy(x, y, i0, m, out, width)


@njit(inline="always")
def _copy_to_columns(x, y, i0, m, out, width):
    """out[t, p Q + q] = x[p, i0 + t, q] (times y[p, i0 + t, q] unless y is None) for t < m,
    in float64."""
    p_, q_ = x.shape[0], _width(x, width)
    for p in range(p_):
        for t in range(m):
            for q in range(q_):
                v = np.float64(x[p, i0 + t, q])
                out[t, p * q_ + q] = v if y is None else v * np.float64(y[p, i0 + t, q])


@njit(inline="always")
def _copy_from_columns(re, im, i0, m, out, width):
    """out[p, i0 + t, q] = re[t, p Q + q] (+ i im[t, p Q + q] unless im is None) for t < m."""
    p_, q_ = out.shape[0], _width(out, width)
    for p in range(p_):
        for t in range(m):
            for q in range(q_):
                r = p * q_ + q
                out[p, i0 + t, q] = re[t, r] if im is None else complex(re[t, r], im[t, r])


@njit(**_JIT)
def _to_columns(x, y, out, width):
    """out[i, p Q + q] = x[p, i, q] (times y[p, i, q] unless y is None), in float64."""
    m = x.shape[1]
    for i0 in range(0, m, _TILE):
        _tile(_copy_to_columns, x, y, i0, min(_TILE, m - i0), out[i0:], width)


@njit(inline="always")
def _copy_complex_to_columns(x, y, i0, m, out, width):
    """re[t, p Q + q] + i im[t, p Q + q] = x[p, i0 + t, q] for t < m, in float64, with out
    (re, im); y is unused (the copies share one signature)."""
    re, im = out
    p_, q_ = x.shape[0], _width(x, width)
    for p in range(p_):
        for t in range(m):
            for q in range(q_):
                v = x[p, i0 + t, q]
                re[t, p * q_ + q], im[t, p * q_ + q] = v.real, v.imag


@njit(**_JIT)
def _complex_to_columns(x, re, im, width):
    """re[i, p Q + q] + i im[i, p Q + q] = x[p, i, q], in float64 (in tiles, see Layout)."""
    m = x.shape[1]
    for i0 in range(0, m, _TILE):
        _tile(_copy_complex_to_columns, x, None, i0, min(_TILE, m - i0), (re[i0:], im[i0:]),
              width)


@njit(**_JIT)
def _from_columns(re, im, out, width):
    """out[p, i, q] = re[i, p Q + q] (+ i im[i, p Q + q] unless im is None)."""
    m = out.shape[1]
    for i0 in range(0, m, _TILE):
        if im is None:
            _tile(_copy_from_columns, re[i0:], None, i0, min(_TILE, m - i0), out, width)
        else:
            _tile(_copy_from_columns, re[i0:], im[i0:], i0, min(_TILE, m - i0), out, width)


@njit(**_JIT)
def _coupling_grads(gbc, b, c, gb, gc):
    """gb = gbc c and gc = gbc b (the gradient of b_i c_i split by the product rule), each
    into a (P, N-1, Q) array or skipped if None."""
    p_, m, q_ = b.shape
    for p in range(p_):
        for q in range(q_):
            for i in range(m):
                g = gbc[i, p * q_ + q]
                if gb is not None:
                    gb[p, i, q] = g * np.float64(c[p, i, q])
                if gc is not None:
                    gc[p, i, q] = g * np.float64(b[p, i, q])


# --------------------------------------------------------------------------------------------
# Recursions on columns. `bc` holds b_k c_k in column form, or is None for couplings that are
# one constant `k` = b c (compiled as a separate specialisation without the loads). Complex
# products are written out in (real, imag) pairs and 1/d is computed as conj(d) / |d|^2.
# A non-finite input or a zero denominator always reaches an output as NaN: 1/d is inf*0 = NaN
# for d = 0 or infinite d, and a NaN propagates through the recursions into (3).
# Each recursion carries its previous value in a (rows,) array `(cr, ci)` rather than reading
# the previous row of its output: a loop that reads row i-1 and writes row i of one array gets
# a runtime overlap check that the compiler hoists over all rows, fails, and falls back to
# scalar code.
# --------------------------------------------------------------------------------------------


@njit(inline="always")
def _coupling(bc, k, i, r):
    """b_i c_i of row r."""
    return k if bc is None else bc[i, r]


@njit(inline="always")
def _recursion_step(a, ia, bc, j, k, zr, zi, cr, ci, gr, gi, io, dr_out, di_out):
    """One position of (1) or (2) for every row: g = 1 / (a[ia] - z - b_j c_j c), with c the
    carried previous value (no coupling term for j < 0), into row io of (gr, gi) and the carry.
    The denominator also goes to row io of (dr_out, di_out) unless they are None."""
    for r in range(a.shape[1]):
        dr, di = a[ia, r] - zr[r], -zi[r]
        if j >= 0:
            kk = _coupling(bc, k, j, r)
            dr, di = dr - kk * cr[r], di - kk * ci[r]
        m = 1.0 / (dr * dr + di * di)
        xr, xi = dr * m, -di * m
        gr[io, r], gi[io, r] = xr, xi
        cr[r], ci[r] = xr, xi
        if dr_out is not None:
            dr_out[io, r], di_out[io, r] = dr, di


@njit(**_JIT)
def _causal_forward(a, bc, k, zr, zi, cols, out, width):
    """Recursion (1) tile by tile: each tile of _TILE positions of a is copied to columns,
    recursed and copied to out while it is in cache. The result columns keep every position
    for the backward pass if cols has N of them, else only the tile. False if some g_i is not
    finite: a non-finite value anywhere reaches the last position (once a denominator or g is
    infinite or NaN, every later denominator is NaN: 0 * inf = NaN, and 1/d = inf * 0 = NaN)."""
    n = a.shape[1]
    ta, gr, gi = cols[_A], cols[_GR], cols[_GI]
    keep = cols.shape[1] >= n
    rows = ta.shape[1]
    cr, ci = np.empty(rows), np.empty(rows)
    for i0 in range(0, n, _TILE):
        m = min(_TILE, n - i0)
        base = i0 if keep else 0
        _tile(_copy_to_columns, a, None, i0, m, ta, width)
        for t in range(m):
            i = i0 + t
            _recursion_step(ta, t, bc, i - 1, k, zr, zi, cr, ci, gr, gi, base + t, None, None)
        _tile(_copy_from_columns, gr[base:], gi[base:], i0, m, out, width)
    for r in range(rows):
        if not (np.isfinite(cr[r]) and np.isfinite(ci[r])):
            return False
    return True


@njit(**_JIT)
def _full_columns(cols, bc, k, zr, zi):
    """Recursions (1) and (2) in one interleaved sweep (two independent recursions hide each
    other's latency when rows are few), then (3) into the result columns; False if some G_ii is
    not finite. The denominator of (3) is that of (1) minus b_i c_i r_{i+1}; the sweep parks
    the denominators of (1) in the result columns."""
    a, gr, gi = cols[_A], cols[_GR], cols[_GI]
    lr, li, rr, ri = cols[_LR], cols[_LI], cols[_RR], cols[_RI]
    n, rows = a.shape
    clr, cli, crr, cri = np.empty(rows), np.empty(rows), np.empty(rows), np.empty(rows)
    for s in range(n):
        _recursion_step(a, s, bc, s - 1, k, zr, zi, clr, cli, lr, li, s, gr, gi)
        j = n - 1 - s
        _recursion_step(a, j, bc, j if s > 0 else -1, k, zr, zi, crr, cri, rr, ri, j, None, None)
    bad = np.zeros(rows)
    for i in range(n - 1):
        for r in range(rows):
            kk = _coupling(bc, k, i, r)
            dr = gr[i, r] - kk * rr[i + 1, r]
            di = gi[i, r] - kk * ri[i + 1, r]
            m = 1.0 / (dr * dr + di * di)
            xr, xi = dr * m, -di * m
            gr[i, r], gi[i, r] = xr, xi
            bad[r] += 0.0 * (xr + xi)  # NaN iff some value is NaN or infinite
    for r in range(rows):  # (3) at the last position is (1) there
        xr, xi = lr[n - 1, r], li[n - 1, r]
        gr[n - 1, r], gi[n - 1, r] = xr, xi
        bad[r] += 0.0 * (xr + xi)
    return not np.any(bad != 0.0)


@njit(**_JIT)
def _forward(a, b, c, k, z, causal, cols, out, width):
    """The causal (1) or full (3) diagonal of every row into `out` (P, N, Q), with the
    workspace `cols`. a (P, N, Q); b, c (P, N-1, Q), or None for the constant coupling product
    k; z (P or 1, Q or 1) complex. Returns 0, or 1 if some z is not finite with Im z > 0
    (nothing computed), or 2 if some output is not finite (out not written)."""
    p_, q_ = a.shape[0], _width(a, width)
    zr, zi = np.empty(p_ * q_), np.empty(p_ * q_)
    zp, zq = z.shape  # each 1 or the full count: a select, not an integer division
    for p in range(p_):
        for q in range(q_):
            v = z[p if zp > 1 else 0, q if zq > 1 else 0]
            if not (np.isfinite(v.real) and np.isfinite(v.imag) and v.imag > 0):
                return 1
            zr[p * q_ + q], zi[p * q_ + q] = v.real, v.imag
    if b is not None:
        _to_columns(b, c, cols[_BC], width)
    if causal:
        if b is None:
            return 0 if _causal_forward(a, None, k, zr, zi, cols, out, width) else 2
        return 0 if _causal_forward(a, cols[_BC], k, zr, zi, cols, out, width) else 2
    _to_columns(a, None, cols[_A], width)
    if b is None:
        ok = _full_columns(cols, None, k, zr, zi)
    else:
        ok = _full_columns(cols, cols[_BC], k, zr, zi)
    if not ok:
        return 2
    _from_columns(cols[_GR], cols[_GI], out, width)
    return 0


@njit(inline="always")
def _adjoint_of_denominator(hr, hi, gr, gi):
    """-h g^2: the adjoint of d for g = 1/d, given the adjoint h of g."""
    qr, qi = gr * gr - gi * gi, 2.0 * gr * gi
    return -(hr * qr - hi * qi), -(hr * qi + hi * qr)


# The backward kernels propagate h = conj(w) (w: torch's incoming gradient) with holomorphic
# derivatives. The adjoint s_i of a_i is complex: grad_a = Re(s), and since every denominator
# depends on a_i - z, grad_z = conj(-sum_i s_i); the kernels sum s over the positions into
# sz (2, rows). work[2] receives grad_{b_k c_k} (real) when the couplings are tensors.


@njit(**_JIT)
def _causal_adjoint(w, bc, k, cols, work, ga, sz, width):
    """Adjoint of (1), s_i = -g_i^2 (h_i - b_i c_i s_{i+1}), tile by tile from the last
    position, like the forward pass: each tile of w is copied to columns (work[0], work[1]),
    replaced by s and copied to ga (unless None) while it is in cache."""
    gr, gi, sr, si, gbc = cols[_GR], cols[_GI], work[0], work[1], work[2]
    n, rows = gr.shape
    cr, ci = np.empty(rows), np.empty(rows)
    for i0 in range((n - 1) // _TILE * _TILE, -1, -_TILE):
        m = min(_TILE, n - i0)
        _tile(_copy_complex_to_columns, w, None, i0, m, (sr, si), width)
        for t in range(m - 1, -1, -1):
            i = i0 + t
            for r in range(rows):
                hr, hi = sr[t, r], -si[t, r]
                if i < n - 1:
                    kk = _coupling(bc, k, i, r)
                    hr, hi = hr - kk * cr[r], hi - kk * ci[r]
                    if bc is not None:
                        gbc[i, r] = -(cr[r] * gr[i, r] - ci[r] * gi[i, r])
                xr, xi = _adjoint_of_denominator(hr, hi, gr[i, r], gi[i, r])
                sr[t, r], si[t, r] = xr, xi
                cr[r], ci[r] = xr, xi
                sz[0, r] += xr
                sz[1, r] += xi
        if ga is not None:
            _tile(_copy_from_columns, sr, None, i0, m, ga, width)


@njit(**_JIT)
def _full_adjoint(cols, bc, k, work):
    """Adjoint of (3) (e_i, in place of w), then of (1) and (2) in one interleaved sweep:
    u_i and v_i are the summed adjoints of the i-th denominators of (3)+(1) and (3)+(2); a_i
    receives u_i + v_i - e_i."""
    gr, gi, lr, li, rr, ri = cols[_GR], cols[_GI], cols[_LR], cols[_LI], cols[_RR], cols[_RI]
    er, ei, gbc, ur, ui, vr, vi = work[0], work[1], work[2], work[3], work[4], work[5], work[6]
    n, rows = gr.shape
    for i in range(n):
        for r in range(rows):
            er[i, r], ei[i, r] = _adjoint_of_denominator(er[i, r], -ei[i, r], gr[i, r], gi[i, r])
    cur, cui, cvr, cvi = np.empty(rows), np.empty(rows), np.empty(rows), np.empty(rows)
    for s in range(n):
        i, j = n - 1 - s, s  # (1) is swept backwards, (2) forwards
        for r in range(rows):
            xr, xi = er[i, r], ei[i, r]
            if s > 0:
                kk = _coupling(bc, k, i, r)
                tr, ti = _adjoint_of_denominator(-kk * cur[r], -kk * cui[r], lr[i, r], li[i, r])
                xr, xi = xr + tr, xi + ti
            ur[i, r], ui[i, r] = xr, xi
            cur[r], cui[r] = xr, xi
        for r in range(rows):
            xr, xi = er[j, r], ei[j, r]
            if s > 0:
                kk = _coupling(bc, k, j - 1, r)
                tr, ti = _adjoint_of_denominator(-kk * cvr[r], -kk * cvi[r], rr[j, r], ri[j, r])
                xr, xi = xr + tr, xi + ti
            vr[j, r], vi[j, r] = xr, xi
            cvr[r], cvi[r] = xr, xi
    if bc is not None:
        for i in range(n - 1):
            for r in range(rows):
                gbc[i, r] = -((ur[i + 1, r] * lr[i, r] - ui[i + 1, r] * li[i, r])
                              + (vr[i, r] * rr[i + 1, r] - vi[i, r] * ri[i + 1, r]))
    for i in range(n):
        for r in range(rows):
            er[i, r] = ur[i, r] + vr[i, r] - er[i, r]
            ei[i, r] = ui[i, r] + vi[i, r] - ei[i, r]


@njit(**_JIT)
def _full_backward(w, bc, k, cols, work, ga, sz, width):
    """The full diagonal's adjoint on whole columns: w copied to (work[0], work[1]), replaced
    by s, summed into sz and copied to ga (unless None)."""
    _complex_to_columns(w, work[0], work[1], width)
    _full_adjoint(cols, bc, k, work)
    sr, si = work[0], work[1]
    for i in range(sr.shape[0]):
        for r in range(sr.shape[1]):
            sz[0, r] += sr[i, r]
            sz[1, r] += si[i, r]
    if ga is not None:
        _from_columns(sr, None, ga, width)


@njit(**_JIT)
def _backward(w, b, c, k, causal, cols, work, ga, gb, gc, gz, width):
    """Reverse mode through the forward pass that left `cols`, for the upstream gradient
    w (P, N, Q) complex: grad_a into ga (P, N, Q), grad_b and grad_c into gb, gc (P, N-1, Q)
    (each skipped if None), and grad_z summed into gz (zp, zq) complex, zeros on entry, over
    the rows that share one z (z's blocks, see _shift_blocks). work (3, N or a tile, P Q)
    float64 for the causal diagonal (N if the couplings are tensors), (7, N, P Q) for the
    full one."""
    sz = np.zeros((2, cols.shape[2]))
    if causal:
        if b is None:
            _causal_adjoint(w, None, k, cols, work, ga, sz, width)
        else:
            _causal_adjoint(w, cols[_BC], k, cols, work, ga, sz, width)
    elif b is None:
        _full_backward(w, None, k, cols, work, ga, sz, width)
    else:
        _full_backward(w, cols[_BC], k, cols, work, ga, sz, width)
    if b is not None and (gb is not None or gc is not None):
        _coupling_grads(work[2], b, c, gb, gc)
    p_, q_ = w.shape[0], _width(w, width)
    zp, zq = gz.shape  # as z's blocks in _forward
    for p in range(p_):
        for q in range(q_):
            r = p * q_ + q
            gz[p if zp > 1 else 0, q if zq > 1 else 0] += complex(-sz[0, r], sz[1, r])


# --------------------------------------------------------------------------------------------
# Validation and layout
# --------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """How a call maps onto the kernels: rows p Q + q of (P, M, Q) arrays (see Layout)."""

    batch: tuple[int, ...]
    n: int
    inner: bool  # Q is the last batch axis (stored inside the positions), else Q = 1
    p: int
    q: int
    causal: bool
    dtype: torch.dtype
    cdtype: torch.dtype
    width: tuple[int, ...] | None  # Q as a tuple's length for the kernels (see Layout), or None
    zblock: tuple[int, int]  # the shape of z's blocks (_shift_shape)


def _is_real_number_type(t: type) -> bool:
    """A Python real number's type (bool excluded): what b and c may be besides tensors."""
    return t is not bool and issubclass(t, (int, float))


def _describe(x) -> tuple | type:
    """What the validation reads of b, c or z: a tensor's dtype, device and shape, or the type
    of anything else (the values of numbers are checked on every call, outside the cache)."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.device, x.shape
    return type(x)


def _prepare(a, b, c, z, causal: bool) -> tuple[_Plan, object, object, float]:
    """Validate everything but the values of the tensors a, b, c, z (the kernels detect bad
    values without a pass of their own; _check_finite and _check_shift name them); return the
    plan and the couplings (b, c, k) of _couplings."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"a must be a torch.Tensor, got {type(a).__name__}")
    plan = _plan(a.dtype, a.device, a.shape, a.stride(), _describe(b), _describe(c),
                 _describe(z), causal)
    b, c, k = _couplings(plan, a, b, c)
    if not isinstance(z, torch.Tensor):
        _check_shift(z)
    return plan, b, c, k


def _check_tensor(name: str, dtype: torch.dtype, device: torch.device, shape: torch.Size):
    if dtype not in _COMPLEX:
        raise TypeError(f"{name} must be real float32 or float64, got {dtype}")
    if device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {device}")
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """numpy's broadcasting of batch shapes (its function costs several times this one)."""
    ndim = max(map(len, shapes))
    out = [1] * ndim
    for shape in shapes:
        for i, d in enumerate(shape, ndim - len(shape)):
            if d != 1 and d != out[i]:
                if out[i] != 1:
                    raise ValueError("batch shapes do not broadcast: " + ", ".join(
                        f"{name} {tuple(s)}" for name, s in zip("abcz", shapes, strict=True)))
                out[i] = d
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _plan(dtype: torch.dtype, device: torch.device, shape: torch.Size, strides: tuple[int, ...],
          b: tuple | type, c: tuple | type, z: tuple | type, causal: bool) -> _Plan:
    """The checks and the plan of a call, from a's dtype, device, shape and strides and the
    descriptions (_describe) of b, c, z; cached, since a model repeats a few signatures."""
    _check_tensor("a", dtype, device, shape)
    for name, t in (("b", b), ("c", c)):
        if isinstance(t, tuple):
            _check_tensor(name, *t)
        elif not _is_real_number_type(t):
            raise TypeError(f"{name} must be a torch.Tensor or a real number, got {t.__name__}")
    tensors = [t for t in (b, c) if isinstance(t, tuple)]
    if any(t[0] != dtype for t in tensors):
        raise TypeError("a, b, c must share one dtype, got " + ", ".join(
            [str(dtype)] + [str(t[0]) if isinstance(t, tuple) else "a number" for t in (b, c)]))
    n = shape[-1]
    if n == 0:
        raise ValueError(f"a must have at least one entry on its last axis, got shape "
                         f"{tuple(shape)}")
    shapes = [tuple(shape[:-1])]
    for name, t in (("b", b), ("c", c)):
        if isinstance(t, tuple):
            if t[2][-1] != n - 1:
                raise ValueError(f"{name} must have N-1 = {n - 1} entries on its last axis "
                                 f"(a has N = {n}), got shape {tuple(t[2])}")
            shapes.append(tuple(t[2][:-1]))
        else:
            shapes.append(())
    cdtype = _COMPLEX[dtype]
    if isinstance(z, tuple):
        zdtype, zdevice, zshape = z
        if not (zdtype.is_complex or zdtype.is_floating_point):
            raise TypeError(f"z must be a complex tensor, got {zdtype}")
        if not zdtype.is_complex:
            raise ValueError("z must have Im z > 0, got a real tensor (Im z = 0)")
        if zdtype != cdtype:
            raise TypeError(f"z must be {cdtype} for {dtype} inputs, got {zdtype}")
        if zdevice.type != "cpu":
            raise ValueError(f"z must be on the CPU, got device {zdevice}")
        shapes.append(tuple(zshape))
    elif z is bool or not issubclass(z, (int, float, complex)):
        raise TypeError(f"z must be a Python number or a complex tensor, got {z.__name__}")
    else:
        shapes.append(())
    batch = _broadcast(shapes)
    inner = (len(batch) > 0 and batch[-1] > 1 and n > 1 and shapes[0] == batch
             and strides[-1] > strides[-2])
    q = batch[-1] if inner else 1
    return _Plan(batch, n, inner, math.prod(batch) // q, q, causal, dtype, cdtype,
                 _WIDTHS.get(q), _shift_shape(shapes[-1], batch, inner, q))


def _check_shift(z: complex | torch.Tensor) -> None:
    if isinstance(z, torch.Tensor):
        zn = z.numpy(force=True)
        finite, positive = np.isfinite(zn).all(), (zn.imag > 0).all()
    else:
        finite, positive = cmath.isfinite(z), complex(z).imag > 0
    if not finite:
        raise ValueError("z contains NaN or Inf")
    if not positive:
        low = zn.imag.min() if isinstance(z, torch.Tensor) else complex(z).imag
        raise ValueError(f"z must have Im z > 0 (the resolvent is taken in the upper half "
                         f"plane), got min Im z = {low}")


def _check_finite(a, b, c) -> None:
    for name, t in (("a", a), ("b", b), ("c", c)):
        if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf; all inputs must be finite")


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.complex64: np.complex64,
          torch.complex128: np.complex128}


def _blocks(t: torch.Tensor, plan: _Plan, m: int) -> np.ndarray:
    """t (..., m) broadcast to the batch, as a (P, m, Q) array: a view if the strides allow."""
    x = t.numpy(force=True)
    if x.shape[:-1] != plan.batch:
        x = np.broadcast_to(x, (*plan.batch, m))
    return (x.swapaxes(-1, -2) if plan.inner else x).reshape(plan.p, m, plan.q)


def _shift_shape(shape: tuple[int, ...], batch: tuple[int, ...], inner: bool, q: int
                 ) -> tuple[int, int]:
    """(P or 1, Q or 1): the shape of the blocks of a z of this shape (the kernels broadcast a
    length-1 axis), one z shared by the rows p Q + q with the same (p mod zp, q mod zq)."""
    if math.prod(shape) == 1:
        return 1, 1
    if inner and shape == batch[-1:]:
        return 1, q
    return math.prod(batch) // q, q


def _shift_blocks(z: complex | torch.Tensor, plan: _Plan) -> np.ndarray:
    """z as an array of the shape _shift_shape gives: a view of z unless z broadcasts to the
    batch in another way than those."""
    if not isinstance(z, torch.Tensor):
        return np.array([[z]], dtype=np.complex128)
    x = z.numpy(force=True)
    if x.size == plan.zblock[0] * plan.zblock[1]:
        return x.reshape(plan.zblock)
    return np.broadcast_to(x, plan.batch).reshape(plan.zblock)


def _empty(plan: _Plan, m: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new (*batch, m) tensor stored with the rows' layout, and its (P, m, Q) numpy view."""
    x = np.empty((plan.p, m, plan.q), dtype=_NUMPY[dtype])
    if plan.inner:
        return torch.from_numpy(x.reshape(*plan.batch[:-1], m, plan.q).swapaxes(-1, -2)), x
    return torch.from_numpy(x.reshape(*plan.batch, m)), x


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient of the broadcast shape down to the input's `shape`."""
    lead = g.dim() - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(d for d, s in enumerate(shape) if s == 1 and g.shape[d] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """A float64 work array that is not kept after the call: the thread's next call reuses it,
    so that large calls do not map (and fault in) fresh pages every time."""
    size = math.prod(shape)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < size:
        buf = _SCRATCH.buf = np.empty(size)
    return buf[:size].reshape(shape)


def _run_forward(plan: _Plan, a, b, c, k: float, z, keep: bool
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """The result tensor and the workspace the backward pass reads (if `keep`)."""
    n, rows = plan.n, plan.p * plan.q
    out, out_view = _empty(plan, n, plan.cdtype)
    if plan.causal:  # the causal pass needs only a tile of each column unless kept
        shape = (4, n if keep or b is not None else min(n, _TILE), rows)
    else:
        shape = (8, n, rows)
    cols = np.empty(shape) if keep else _scratch(shape)
    couplings = (None, None) if b is None else (_blocks(b, plan, n - 1), _blocks(c, plan, n - 1))
    status = _forward(_blocks(a, plan, n), *couplings, k, _shift_blocks(z, plan),
                      plan.causal, cols, out_view, plan.width)
    if status == 1:
        _check_shift(z)
    if status == 2:  # a non-finite input (raises ValueError here) or a singular block
        _check_finite(a, b, c)
        raise FloatingPointError(
            "resolvent_diag produced a non-finite value: a leading or trailing block of "
            "T - zI is (numerically) singular, which needs some b_k * c_k < 0, or b * c "
            "overflowed")
    return out, cols


class _ResolventDiag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c, z, plan, k):
        out, ctx.cols = _run_forward(plan, a, b, c, k, z, keep=True)
        ctx.plan, ctx.k = plan, k
        ctx.shapes = (a.shape, None if b is None else b.shape, None if c is None else c.shape,
                      z.shape if isinstance(z, torch.Tensor) else None)
        # The result is saved although backward reads the workspace instead: changing it in
        # place then makes backward raise, rather than differentiate values it did not make.
        ctx.save_for_backward(b, c, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        plan, cols = ctx.plan, ctx.cols
        b, c, _ = ctx.saved_tensors
        n, rows = plan.n, plan.p * plan.q
        full = torch.Size((*plan.batch, n))
        grads, views, summed = [None] * 4, [None] * 3, [False] * 3
        for i, (shape, m) in enumerate(zip(ctx.shapes[:3], (n, n - 1, n - 1), strict=True)):
            if ctx.needs_input_grad[i]:
                summed[i] = shape != full[:-1] + (m,)  # broadcast: summed in float64 below
                grads[i], views[i] = _empty(plan, m, torch.float64 if summed[i] else plan.dtype)
        zshape = ctx.shapes[3]
        gz = np.zeros(plan.zblock, dtype=np.complex128)
        if plan.causal:  # the causal adjoint needs only a tile of w's columns, see _backward
            work = _scratch((3, n if b is not None else min(n, _TILE), rows))
        else:
            work = _scratch((7, n, rows))
        couplings = (None, None) if b is None else (_blocks(b, plan, n - 1),
                                                    _blocks(c, plan, n - 1))
        _backward(_blocks(grad_out, plan, n), *couplings, ctx.k, plan.causal, cols, work,
                  *views, gz, plan.width)
        for i, shape in enumerate(ctx.shapes[:3]):
            if summed[i]:
                grads[i] = _sum_to(grads[i], shape).to(plan.dtype)
        if ctx.needs_input_grad[3]:
            gz = torch.from_numpy(gz)
            if gz.numel() == math.prod(zshape):  # summed over the rows that share each z
                gz = gz.view(zshape)
            else:
                gz = _sum_to(gz.view(plan.batch), zshape)
            grads[3] = gz.to(plan.cdtype)
        return (*grads, None, None)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _couplings(plan: _Plan, a, b, c):
    """(b, c, k) for b and c checked by _plan (tensors or real numbers; numbers must be
    finite): numbers b and c become their product k (in a's precision, as if they were tensors
    full of them) and None; one number beside a tensor becomes a tensor."""
    if not isinstance(b, torch.Tensor) and not isinstance(c, torch.Tensor):
        k = _number_product(b, c, plan.dtype == torch.float32)
        if not math.isfinite(k):  # a non-finite b or c (or a product that overflows)
            _check_numbers(b, c)
        return None, None, k
    _check_numbers(b, c)
    b, c = (t if isinstance(t, torch.Tensor) else a.new_full((plan.n - 1,), t) for t in (b, c))
    return b, c, 0.0


def _check_numbers(b, c) -> None:
    for name, t in (("b", b), ("c", c)):
        if not isinstance(t, torch.Tensor) and not math.isfinite(t):
            raise ValueError(f"{name} must be finite, got {t}")


# Native-mode struct packs a float with a C cast: round to nearest, and infinity beyond float32's
# range, as numpy and a float32 tensor hold it, at a fraction of the cost of two numpy scalars.
_FLOAT32_PAIR = struct.Struct("ff")


def _number_product(b: float, c: float, single: bool) -> float:
    """b c in float64, after rounding b and c to float32 if `single`."""
    if single:
        b, c = _FLOAT32_PAIR.unpack(_FLOAT32_PAIR.pack(b, c))
    return float(b) * float(c)


def resolvent_diag(
    a: torch.Tensor,
    b: torch.Tensor | float,
    c: torch.Tensor | float,
    z: complex | torch.Tensor,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """Diagonal of the resolvent (T - zI)^-1 of a tridiagonal T, eq. (3), or with
    ``causal=True`` the causal diagonal g_i of eq. (1).

    a: (..., N) diagonal; b: (..., N-1) super-diagonal; c: (..., N-1) sub-diagonal; all float32
    or all float64. b and c may also be Python numbers: the same coupling at every position
    (taken in a's precision, exactly as a tensor full of it; no gradient). z: Python number or
    complex tensor (complex64 for float32, complex128 for float64) with Im z > 0,
    broadcastable to the batch shape (...). The batch dims of a, b, c, z broadcast together.
    Returns (..., N) complex64 for float32 inputs, complex128 for float64, stored like a (an
    ``a`` that is a transposed view, positions outside its last batch axis, gives a result
    stored the same way). Differentiable (once) w.r.t. tensors a, b, c, z. Raises
    TypeError/ValueError on invalid input and FloatingPointError if a leading/trailing block
    is singular.
    """
    plan, b, c, k = _prepare(a, b, c, z, causal)
    if torch.is_grad_enabled() and (
            a.requires_grad or (b is not None and (b.requires_grad or c.requires_grad))
            or (isinstance(z, torch.Tensor) and z.requires_grad)):
        return _ResolventDiag.apply(a, b, c, z, plan, k)
    return _run_forward(plan, a, b, c, k, z, keep=False)[0]


def resolvent_diag_loop(
    a: torch.Tensor,
    b: torch.Tensor | float,
    c: torch.Tensor | float,
    z: complex | torch.Tensor,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """Reference for :func:`resolvent_diag`: eqs. (1)-(3) as a Python loop over positions of
    batched torch ops (complex128 internally), differentiable by autograd. Same arguments,
    validation and output dtype; slow."""
    plan = _prepare(a, b, c, z, causal)[0]
    batch, cdtype = plan.batch, plan.cdtype
    if isinstance(z, torch.Tensor):
        _check_shift(z)
    else:
        z = torch.tensor(complex(z), dtype=torch.complex128)  # exact; no grad is needed
    _check_finite(a, b, c)
    b, c = (t if isinstance(t, torch.Tensor) else a.new_full((a.shape[-1] - 1,), t)
            for t in (b, c))
    a, z = a.to(torch.complex128), z.to(torch.complex128)
    bc = (b.double() * c.double()).to(torch.complex128)
    n = a.shape[-1]
    left = [1 / (a[..., 0] - z)]
    for i in range(1, n):
        left.append(1 / (a[..., i] - z - bc[..., i - 1] * left[-1]))
    if causal:
        g = torch.stack(torch.broadcast_tensors(*left), dim=-1)
        return g.expand(*batch, n).to(cdtype)
    right = [1 / (a[..., n - 1] - z)]
    for i in range(n - 2, -1, -1):
        right.append(1 / (a[..., i] - z - bc[..., i] * right[-1]))
    right.reverse()
    diag = []
    for i in range(n):
        d = a[..., i] - z
        if i > 0:
            d = d - bc[..., i - 1] * left[i - 1]
        if i < n - 1:
            d = d - bc[..., i] * right[i + 1]
        diag.append(1 / d)
    return torch.stack(torch.broadcast_tensors(*diag), dim=-1).expand(*batch, n).to(cdtype)


def causal_step(
    a_i: torch.Tensor,
    bc_prev: torch.Tensor | None,
    z: complex | torch.Tensor,
    g_prev: torch.Tensor | None,
) -> torch.Tensor:
    """One step of eq. (1), g_i = 1 / (a_i - z - bc_prev * g_prev), for state-cached decoding;
    bc_prev = b_{i-1} * c_{i-1}. With ``g_prev=None`` (the start) it returns g_0 = 1/(a_0 - z)
    and ``bc_prev`` is ignored. Plain torch ops (differentiable by autograd); the precision
    follows torch's type promotion of the arguments, so pass float64/complex128 to match
    :func:`resolvent_diag` to float64 tolerance."""
    if g_prev is None:
        return 1 / (a_i - z)
    return 1 / (a_i - z - bc_prev * g_prev)
