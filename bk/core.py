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

Everything is computed in complex128 (also for float32 inputs) by numba kernels; the backward
pass is reverse-mode differentiation through (1)-(3), with torch's convention for complex
gradients (grad_u = conj(f'(u)) * grad_w, real part for the real inputs a, b, c).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

__all__ = ["causal_step", "resolvent_diag", "resolvent_diag_loop"]

_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


# --------------------------------------------------------------------------------------------
# Kernels. Arrays are C-contiguous: a (B, N), b and c (B, N-1), all float32 or all float64,
# z (B,) complex128, outputs (B, N) complex128; all arithmetic is in double precision. Complex
# products with the real a and b*c are written out in (real, imag) pairs and 1/d is computed
# as conj(d) / |d|^2. Rows are processed in blocks of `block` rows with the row loop innermost,
# so that the independent recursions of a block overlap in the CPU pipeline (one recursion
# alone is latency-bound); see _block for the size. Forward kernels return False if an output
# is non-finite (tracked as a running sum of 0*value, NaN iff some value was NaN or infinite).
# A non-finite input or a zero denominator always reaches an output as NaN: 1/d is inf*0 = NaN
# for d = 0 or infinite d, and a NaN propagates through the recursions into (3).
# --------------------------------------------------------------------------------------------


def _block(n: int) -> int:
    """Rows per block: enough to hide the latency of a recursion step, few enough that the
    block's arrays stay in cache (measured on 2 cores, batch 8, N = 4096 ... 65536)."""
    return 4 if n <= 8192 else 2


@njit(inline="always")
def _bc(b, c, row, i):
    """b_i c_i of a row, in double precision."""
    return np.float64(b[row, i]) * np.float64(c[row, i])


@njit(inline="always")
def _recip(dr, di):
    """1 / (dr + i di) as a (real, imag) pair."""
    m = 1.0 / (dr * dr + di * di)
    return dr * m, -di * m


@njit(**_JIT)
def _causal_fwd(a, b, c, z, g, block):
    """Recursion (1) for every row, into g."""
    bad = 0.0
    rows, n = a.shape
    for r0 in range(0, rows, block):
        for i in range(n):
            for row in range(r0, min(r0 + block, rows)):
                dr, di = a[row, i] - z[row].real, -z[row].imag
                if i > 0:
                    k, p = _bc(b, c, row, i - 1), g[row, i - 1]
                    dr, di = dr - k * p.real, di - k * p.imag
                gr, gi = _recip(dr, di)
                g[row, i] = complex(gr, gi)
                bad += 0.0 * gr + 0.0 * gi
    return bad == 0.0


@njit(**_JIT)
def _full_fwd(a, b, c, z, gl, gr, out, block):
    """Recursions (1) into gl and (2) into gr, interleaved in one sweep, then (3) into out.
    The denominator of (3) is that of (1) minus b_i c_i r_{i+1}; the sweep parks the
    denominators of (1) in out."""
    bad = 0.0
    rows, n = a.shape
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        for i in range(n):
            j = n - 1 - i
            for row in range(r0, r1):
                zr, zi = z[row].real, z[row].imag
                dr, di = a[row, i] - zr, -zi
                er, ei = a[row, j] - zr, -zi
                if i > 0:
                    k, p = _bc(b, c, row, i - 1), gl[row, i - 1]
                    dr, di = dr - k * p.real, di - k * p.imag
                    k, p = _bc(b, c, row, j), gr[row, j + 1]
                    er, ei = er - k * p.real, ei - k * p.imag
                out[row, i] = complex(dr, di)
                lr, li = _recip(dr, di)
                gl[row, i] = complex(lr, li)
                rr, ri = _recip(er, ei)
                gr[row, j] = complex(rr, ri)
        for row in range(r0, r1):
            for i in range(n):
                d = out[row, i]
                dr, di = d.real, d.imag
                if i < n - 1:
                    k, p = _bc(b, c, row, i), gr[row, i + 1]
                    dr, di = dr - k * p.real, di - k * p.imag
                wr, wi = _recip(dr, di)
                out[row, i] = complex(wr, wi)
                bad += 0.0 * wr + 0.0 * wi
    return bad == 0.0


@njit(inline="always")
def _adjoint(hr, hi, g):
    """Adjoint of the denominator d of g = 1/d, given the adjoint h of g: -h g^2."""
    qr, qi = g.real * g.real - g.imag * g.imag, 2.0 * g.real * g.imag
    return complex(-(hr * qr - hi * qi), -(hr * qi + hi * qr))


# The backward kernels propagate h = conj(grad) (grad: torch's incoming gradient) with
# holomorphic derivatives. They return ha, the adjoint of every denominator's a_i term, which is
# complex: grad_a = Re(ha), and since every denominator depends on a_i - z,
# grad_z = conj(-sum_i ha_i). gbc receives grad_{b_k c_k} (real).


@njit(**_JIT)
def _causal_bwd(grad, b, c, g, ha, gbc, block):
    """Adjoint of (1): ha_i = -s_i g_i^2 with s_i = h_i - ha_{i+1} bc_i."""
    rows, n = g.shape
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        for i in range(n - 1, -1, -1):
            for row in range(r0, r1):
                sr, si = grad[row, i].real, -grad[row, i].imag
                if i < n - 1:
                    k, p = _bc(b, c, row, i), ha[row, i + 1]
                    sr, si = sr - k * p.real, si - k * p.imag
                ha[row, i] = _adjoint(sr, si, g[row, i])
        for row in range(r0, r1):
            for i in range(n - 1):
                gbc[row, i] = -(ha[row, i + 1] * g[row, i]).real


@njit(**_JIT)
def _full_bwd(grad, b, c, gl, gr, out, ha, gbc, block):
    """Adjoint of (3) (into ha), then of (1) and (2) in one interleaved sweep. ul_i, vr_i are
    the summed adjoints of the i-th denominators of (3)+(1) and (3)+(2), respectively."""
    rows, n = out.shape
    ul = np.empty((min(rows, block), n), dtype=np.complex128)
    vr = np.empty_like(ul)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        for row in range(r0, r1):
            for i in range(n):
                ha[row, i] = _adjoint(grad[row, i].real, -grad[row, i].imag, out[row, i])
        for s in range(n):
            i, j = n - 1 - s, s  # (1) is swept backwards, (2) forwards
            for row in range(r0, r1):
                q = row - r0
                sr = si = 0.0
                if s > 0:
                    k, p = _bc(b, c, row, i), ul[q, i + 1]
                    sr, si = -k * p.real, -k * p.imag
                ul[q, i] = ha[row, i] + _adjoint(sr, si, gl[row, i])
                if s > 0:
                    k, p = _bc(b, c, row, j - 1), vr[q, j - 1]
                    sr, si = -k * p.real, -k * p.imag
                vr[q, j] = ha[row, j] + _adjoint(sr, si, gr[row, j])
        for row in range(r0, r1):
            q = row - r0
            for i in range(n):
                ha[row, i] = ul[q, i] + vr[q, i] - ha[row, i]
            for i in range(n - 1):
                gbc[row, i] = -(ul[q, i + 1] * gl[row, i] + vr[q, i] * gr[row, i + 1]).real


# --------------------------------------------------------------------------------------------
# Validation and layout
# --------------------------------------------------------------------------------------------


def _check(a, b, c, z):
    """Validate inputs except the finiteness of a, b, c (see _check_finite); return (batch
    shape, z as a complex tensor, output dtype)."""
    for name, t in (("a", a), ("b", b), ("c", c)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _COMPLEX:
            raise TypeError(f"{name} must be real float32 or float64, got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {t.device}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if not a.dtype == b.dtype == c.dtype:
        raise TypeError(f"a, b, c must share one dtype, got {a.dtype}, {b.dtype}, {c.dtype}")
    n = a.shape[-1]
    if n == 0:
        raise ValueError(f"a must have at least one entry on its last axis, got shape "
                         f"{tuple(a.shape)}")
    for name, t in (("b", b), ("c", c)):
        if t.shape[-1] != n - 1:
            raise ValueError(f"{name} must have N-1 = {n - 1} entries on its last axis "
                             f"(a has N = {n}), got shape {tuple(t.shape)}")
    cdtype = _COMPLEX[a.dtype]
    if isinstance(z, torch.Tensor):
        if not (z.dtype.is_complex or z.dtype.is_floating_point):
            raise TypeError(f"z must be a complex tensor, got {z.dtype}")
        if not z.dtype.is_complex:
            raise ValueError("z must have Im z > 0, got a real tensor (Im z = 0)")
        if z.dtype != cdtype:
            raise TypeError(f"z must be {cdtype} for {a.dtype} inputs, got {z.dtype}")
        if z.device.type != "cpu":
            raise ValueError(f"z must be on the CPU, got device {z.device}")
        zn = z.detach().resolve_conj().numpy()
    elif isinstance(z, (int, float, complex)) and not isinstance(z, bool):
        z = torch.tensor(complex(z), dtype=torch.complex128)  # exact; no grad is needed
        zn = z.numpy()
    else:
        raise TypeError(f"z must be a Python number or a complex tensor, got {type(z).__name__}")
    if not np.isfinite(zn).all():
        raise ValueError("z contains NaN or Inf")
    if not (zn.imag > 0).all():
        raise ValueError(f"z must have Im z > 0 (the resolvent is taken in the upper half "
                         f"plane), got min Im z = {zn.imag.min()}")
    try:
        batch = torch.Size(
            np.broadcast_shapes(a.shape[:-1], b.shape[:-1], c.shape[:-1], z.shape))
    except ValueError as err:
        raise ValueError(f"batch shapes do not broadcast: a {tuple(a.shape[:-1])}, "
                         f"b {tuple(b.shape[:-1])}, c {tuple(c.shape[:-1])}, "
                         f"z {tuple(z.shape)}") from err
    return batch, z, cdtype


def _check_finite(a, b, c):
    for name, t in (("a", a), ("b", b), ("c", c)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf; all inputs must be finite")


def _rows(t: torch.Tensor, batch: torch.Size) -> np.ndarray:
    """`t` as a C-contiguous (prod(batch), t.shape[-1]) numpy array; copies only if needed."""
    t = t.detach()
    if t.shape[:-1] != batch:
        t = t.expand(*batch, t.shape[-1])
    return t.reshape(batch.numel(), t.shape[-1]).contiguous().numpy()


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient of the broadcast shape down to the input's `shape`."""
    lead = g.dim() - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(d for d, s in enumerate(shape) if s == 1 and g.shape[d] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


class _ResolventDiag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c, z, batch, cdtype, causal):
        n = a.shape[-1]
        a_, b_, c_ = (_rows(t, batch) for t in (a, b, c))
        z_ = _rows(z.to(torch.complex128).unsqueeze(-1), batch)[:, 0]
        out = np.empty(a_.shape, dtype=np.complex128)
        if causal:
            ok = _causal_fwd(a_, b_, c_, z_, out, _block(n))
            saved = (out,)
        else:
            gl, gr = np.empty_like(out), np.empty_like(out)
            ok = _full_fwd(a_, b_, c_, z_, gl, gr, out, _block(n))
            saved = (gl, gr, out)
        if not ok:  # a non-finite input (raises ValueError here) or a singular block
            _check_finite(a, b, c)
            raise FloatingPointError(
                "resolvent_diag produced a non-finite value: a leading or trailing block of "
                "T - zI is (numerically) singular, which needs some b_k * c_k < 0, or b * c "
                "overflowed")
        # The result is the saved G itself for complex128 (not a view of it): an in-place
        # change of it then makes backward raise instead of using the changed values.
        result = torch.from_numpy(out.reshape(*batch, n))
        ctx.save_for_backward(b, c, *(torch.from_numpy(t) for t in saved[:-1]), result)
        ctx.meta = (a.shape, z.shape, batch, causal)
        return result.to(cdtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        b, c, *saved = ctx.saved_tensors
        a_shape, z_shape, batch, causal = ctx.meta
        n = a_shape[-1]
        grad = grad_out.to(torch.complex128).reshape(-1, n).contiguous().numpy()
        ha = np.empty((grad.shape[0], n), dtype=np.complex128)
        gbc = np.empty((grad.shape[0], n - 1))
        kernel = _causal_bwd if causal else _full_bwd
        saved = (t.reshape(-1, n).numpy() for t in saved)
        kernel(grad, _rows(b, batch), _rows(c, batch), *saved, ha, gbc, _block(n))
        ha = torch.from_numpy(ha).reshape(*batch, n)
        gbc = torch.from_numpy(gbc).reshape(*batch, n - 1)
        grads = [None] * 4
        if ctx.needs_input_grad[0]:
            grads[0] = _sum_to(ha.real, a_shape).to(b.dtype)
        if ctx.needs_input_grad[1]:
            grads[1] = _sum_to(gbc * c, b.shape).to(b.dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = _sum_to(gbc * b, c.shape).to(c.dtype)
        if ctx.needs_input_grad[3]:
            grads[3] = _sum_to(-ha.sum(-1).conj(), z_shape).to(_COMPLEX[b.dtype])
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def resolvent_diag(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    z: complex | torch.Tensor,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """Diagonal of the resolvent (T - zI)^-1 of a tridiagonal T, eq. (3), or with
    ``causal=True`` the causal diagonal g_i of eq. (1).

    a: (..., N) diagonal; b: (..., N-1) super-diagonal; c: (..., N-1) sub-diagonal; all float32
    or all float64. z: Python number or complex tensor (complex64 for float32, complex128 for
    float64) with Im z > 0, broadcastable to the batch shape (...). The batch dims of a, b, c, z
    broadcast together. Returns (..., N) complex64 for float32 inputs, complex128 for float64.
    Differentiable (once) w.r.t. a, b, c and a tensor z. Raises TypeError/ValueError on invalid
    input and FloatingPointError if a leading/trailing block is singular.
    """
    batch, z, cdtype = _check(a, b, c, z)
    return _ResolventDiag.apply(a, b, c, z, batch, cdtype, causal)


def resolvent_diag_loop(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    z: complex | torch.Tensor,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """Reference for :func:`resolvent_diag`: eqs. (1)-(3) as a Python loop over positions of
    batched torch ops (complex128 internally), differentiable by autograd. Same arguments,
    validation and output dtype; slow."""
    batch, z, cdtype = _check(a, b, c, z)
    _check_finite(a, b, c)
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
