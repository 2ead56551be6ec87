"""A same-math comparator for ``bk.core.resolvent_diag``, used only to benchmark it.

It computes eqs. (1)-(3) of ``bk/core.py`` and their adjoint with the same recursions in float64,
written independently of ``bk.core`` in the layout that suits them best: position-major arrays
``(N, rows)`` with real and imaginary parts split, so that the innermost loop runs over rows, the
independent recursions sit in SIMD lanes, and every access is contiguous. Inputs are prepared
outside the timed calls (``Problem.from_torch``); a timed call is the bare kernel. The ratio
``t_resolvent_diag / t_reference`` is then what the API costs beyond the arithmetic itself:
validation, layout changes, dtype conversions and dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


# Every recursion carries its previous value in a (rows,) array: a loop that reads row i-1 and
# writes row i of one array gets a runtime overlap check that the compiler hoists over all rows,
# fails, and falls back to scalar code.


@njit(**_JIT)
def causal_forward(a, b, c, zr, zi, gr, gi):
    """g_i = 1 / (a_i - z - b_{i-1} c_{i-1} g_{i-1}), eq. (1), into (gr, gi)."""
    n, rows = a.shape
    pr, pi = np.zeros(rows), np.zeros(rows)
    for i in range(n):
        for r in range(rows):
            dr, di = a[i, r] - zr[r], -zi[r]
            if i > 0:
                k = b[i - 1, r] * c[i - 1, r]
                dr, di = dr - k * pr[r], di - k * pi[r]
            m = 1.0 / (dr * dr + di * di)
            pr[r], pi[r] = dr * m, -di * m
            gr[i, r], gi[i, r] = pr[r], pi[r]


@njit(**_JIT)
def full_forward(a, b, c, zr, zi, lr, li, rr, ri, gr, gi):
    """Eq. (1) into (lr, li), eq. (2) into (rr, ri), then eq. (3) into (gr, gi)."""
    causal_forward(a, b, c, zr, zi, lr, li)
    n, rows = a.shape
    pr, pi = np.zeros(rows), np.zeros(rows)
    for i in range(n - 1, -1, -1):
        for r in range(rows):
            dr, di = a[i, r] - zr[r], -zi[r]
            if i < n - 1:
                k = b[i, r] * c[i, r]
                dr, di = dr - k * pr[r], di - k * pi[r]
            m = 1.0 / (dr * dr + di * di)
            pr[r], pi[r] = dr * m, -di * m
            rr[i, r], ri[i, r] = pr[r], pi[r]
    for i in range(n):
        for r in range(rows):
            dr, di = a[i, r] - zr[r], -zi[r]
            if i > 0:
                k = b[i - 1, r] * c[i - 1, r]
                dr, di = dr - k * lr[i - 1, r], di - k * li[i - 1, r]
            if i < n - 1:
                k = b[i, r] * c[i, r]
                dr, di = dr - k * rr[i + 1, r], di - k * ri[i + 1, r]
            m = 1.0 / (dr * dr + di * di)
            gr[i, r], gi[i, r] = dr * m, -di * m


# The backward kernels follow torch's convention for complex gradients: for the upstream gradient
# w of g, the adjoint propagated holomorphically is h = conj(w), and an input u receives
# conj(h_u) (its real part for the real a, b, c). The adjoint of a denominator d of g = 1/d is
# -g^2 times the adjoint of g, and a, z enter every denominator as a - z.


@njit(**_JIT)
def causal_backward(wr, wi, b, c, gr, gi, ga, gb, gc, gzr, gzi):
    """Reverse mode through eq. (1): s_i, the adjoint of the i-th denominator, is
    -g_i^2 (conj(w_i) - b_i c_i s_{i+1}); into ga (N, rows), gb, gc (N-1, rows), gz (rows,)."""
    n, rows = gr.shape
    sr, si = np.zeros(rows), np.zeros(rows)
    gzr[:] = 0.0
    gzi[:] = 0.0
    for i in range(n - 1, -1, -1):
        for r in range(rows):
            tr, ti = wr[i, r], -wi[i, r]
            if i < n - 1:
                k = b[i, r] * c[i, r]
                tr, ti = tr - k * sr[r], ti - k * si[r]
                # b_i c_i multiplies g_i in the denominator of g_{i+1}
                p = -(sr[r] * gr[i, r] - si[r] * gi[i, r])
                gb[i, r], gc[i, r] = p * c[i, r], p * b[i, r]
            qr = gr[i, r] * gr[i, r] - gi[i, r] * gi[i, r]
            qi = 2.0 * gr[i, r] * gi[i, r]
            sr[r], si[r] = -(qr * tr - qi * ti), -(qr * ti + qi * tr)
            ga[i, r] = sr[r]
            gzr[r] -= sr[r]
            gzi[r] += si[r]


@njit(**_JIT)
def full_backward(wr, wi, b, c, lr, li, rr, ri, gr, gi, ga, gb, gc, gzr, gzi, ur, ui, vr, vi):
    """Reverse mode through eqs. (3), (1) and (2). With e_i the adjoint of the i-th denominator
    of (3), (ur, ui) receives u_i = e_i + the adjoint of the i-th denominator of (1), swept
    backwards, and (vr, vi) v_i = e_i + that of (2), swept forwards; a_i then receives
    u_i + v_i - e_i and b_i c_i receives -(u_{i+1} l_i + v_i r_{i+1})."""
    n, rows = gr.shape
    gzr[:] = 0.0
    gzi[:] = 0.0
    for i in range(n):
        for r in range(rows):
            qr = gr[i, r] * gr[i, r] - gi[i, r] * gi[i, r]
            qi = 2.0 * gr[i, r] * gi[i, r]
            er = -(qr * wr[i, r] + qi * wi[i, r])
            ei = -(qi * wr[i, r] - qr * wi[i, r])
            ur[i, r], ui[i, r] = er, ei
            vr[i, r], vi[i, r] = er, ei
            ga[i, r] = -er
            gzi[r] -= ei
    pr, pi = np.zeros(rows), np.zeros(rows)
    for i in range(n - 1, -1, -1):
        for r in range(rows):
            if i < n - 1:
                k = b[i, r] * c[i, r]
                qr = lr[i, r] * lr[i, r] - li[i, r] * li[i, r]
                qi = 2.0 * lr[i, r] * li[i, r]
                ur[i, r] += k * (qr * pr[r] - qi * pi[r])
                ui[i, r] += k * (qr * pi[r] + qi * pr[r])
            pr[r], pi[r] = ur[i, r], ui[i, r]
    for i in range(n):
        for r in range(rows):
            if i > 0:
                k = b[i - 1, r] * c[i - 1, r]
                qr = rr[i, r] * rr[i, r] - ri[i, r] * ri[i, r]
                qi = 2.0 * rr[i, r] * ri[i, r]
                vr[i, r] += k * (qr * pr[r] - qi * pi[r])
                vi[i, r] += k * (qr * pi[r] + qi * pr[r])
            pr[r], pi[r] = vr[i, r], vi[i, r]
    for i in range(n):
        for r in range(rows):
            sr = ur[i, r] + vr[i, r] + ga[i, r]
            ga[i, r] = sr
            gzr[r] -= sr
            gzi[r] += ui[i, r] + vi[i, r]
    for i in range(n - 1):
        for r in range(rows):
            p = -(ur[i + 1, r] * lr[i, r] - ui[i + 1, r] * li[i, r]
                  + vr[i, r] * rr[i + 1, r] - vi[i, r] * ri[i + 1, r])
            gb[i, r], gc[i, r] = p * c[i, r], p * b[i, r]


@dataclass
class Problem:
    """Inputs in the kernels' layout: a (N, rows), b and c (N-1, rows), z split (rows,), all
    float64 and C-contiguous."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    zr: np.ndarray
    zi: np.ndarray

    @classmethod
    def from_torch(cls, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   z: torch.Tensor) -> Problem:
        """From a (rows, N), b and c (rows, N-1) real tensors and z (rows,) complex."""

        def columns(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().double().numpy().T)

        z = z.detach().to(torch.complex128).numpy()
        return cls(columns(a), columns(b), columns(c), np.ascontiguousarray(z.real),
                   np.ascontiguousarray(z.imag))


def forward(p: Problem, causal: bool) -> tuple[np.ndarray, ...]:
    """(gr, gi), plus for causal=False the one-sided recursions (lr, li, rr, ri) that the
    backward pass needs."""
    gr, gi = np.empty_like(p.a), np.empty_like(p.a)
    if causal:
        causal_forward(p.a, p.b, p.c, p.zr, p.zi, gr, gi)
        return gr, gi
    lr, li, rr, ri = (np.empty_like(p.a) for _ in range(4))
    full_forward(p.a, p.b, p.c, p.zr, p.zi, lr, li, rr, ri, gr, gi)
    return gr, gi, lr, li, rr, ri


def forward_backward(p: Problem, wr: np.ndarray, wi: np.ndarray, causal: bool
                     ) -> tuple[np.ndarray, ...]:
    """Forward, then the gradients (ga, gb, gc, gzr, gzi) for the upstream gradient w (N, rows)
    split into real and imaginary parts."""
    gr, gi, *sides = forward(p, causal)
    ga, gb, gc = np.empty_like(p.a), np.empty_like(p.b), np.empty_like(p.c)
    gzr, gzi = np.empty_like(p.zr), np.empty_like(p.zi)
    if causal:
        causal_backward(wr, wi, p.b, p.c, gr, gi, ga, gb, gc, gzr, gzi)
    else:
        work = (np.empty_like(p.a) for _ in range(4))
        full_backward(wr, wi, p.b, p.c, *sides, gr, gi, ga, gb, gc, gzr, gzi, *work)
    return ga, gb, gc, gzr, gzi
