"""One state-cached decoding step of :class:`bk.model.LanguageModel` as a single numba kernel.

``LanguageModel.step`` is the readable, differentiable definition: per layer about 45 torch
operations on one position, each costing a few microseconds of dispatch for a few hundred
arithmetic operations. For inference, :class:`StepKernel` computes the same function (same
weights, same top-1 routing, the same eq. (1) recursion step of ``bk.core``) for a batch of
tokens in one compiled call, so a generated token costs its arithmetic instead of ~200 dispatches.
It is what ``bk.decode`` uses for a plain ``LanguageModel``; tests hold it equal to
``LanguageModel.step``.

The kernel reads a snapshot of the weights taken when the ``StepKernel`` is built (matrices
transposed so that every product is a contiguous multiply-add over the output), so build it
after training and once per generation or search. It does not track gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from bk.model import H0_COUPLING, H0_DIAGONAL, DecodeState, LanguageModel

_SQRT_HALF = math.sqrt(0.5)


@njit(cache=True, fastmath=False, error_model="numpy", nogil=True)
def _layer_norm(x, w, b, eps, out):
    n = x.shape[0]
    mean = x.sum() / n
    var = 0.0
    for i in range(n):
        var += (x[i] - mean) ** 2
    inv = 1.0 / math.sqrt(var / n + eps)
    for i in range(n):
        out[i] = (x[i] - mean) * inv * w[i] + b[i]


@njit(cache=True, fastmath=False, error_model="numpy", nogil=True)
def _affine(x, wt, b, out):
    """out = b + x @ wt, with wt the transposed weight (in, out): contiguous rows of wt."""
    out[:] = b
    for k in range(x.shape[0]):
        xk = x[k]
        for j in range(out.shape[0]):
            out[j] += wt[k, j] * xk


@njit(cache=True, fastmath=False, error_model="numpy", nogil=True)
def _step(tokens, g_prev, started, embed, ln_w, ln_b, router_t, router_b, up_t, up_b, down_t,
          down_b, potential_t, potential_b, z, read_t, read_b, norm_w, norm_b, head_t, head_b,
          eps, logits, g_new):
    """Rows of ``tokens`` through every block; writes ``logits`` (B, V) and ``g_new`` (L, B, C).

    Returns the index of the first token outside the vocabulary, or -1.
    """
    n_layers, n_experts = router_b.shape
    d, channels = embed.shape[1], z.shape[1]
    dt = embed.dtype
    x, h, f = np.empty(d, dt), np.empty(d, dt), np.empty(d, dt)
    gate_logits = np.empty(n_experts, dt)
    hidden = np.empty(up_b.shape[2], dt)
    v = np.empty(channels, dt)
    mixed = np.empty(2 * channels, dt)
    bc = H0_COUPLING * H0_COUPLING
    for r in range(tokens.shape[0]):
        if tokens[r] < 0 or tokens[r] >= embed.shape[0]:
            return r
        x[:] = embed[tokens[r]]
        for layer in range(n_layers):
            _layer_norm(x, ln_w[layer], ln_b[layer], eps, h)
            # top-1 routing: the chosen expert's softmax probability is 1 / sum exp(l - max l)
            _affine(h, router_t[layer], router_b[layer], gate_logits)
            e = 0
            for k in range(1, n_experts):
                if gate_logits[k] > gate_logits[e]:
                    e = k
            total = 0.0
            for k in range(n_experts):
                total += math.exp(gate_logits[k] - gate_logits[e])
            _affine(h, up_t[layer, e], up_b[layer, e], hidden)
            for j in range(hidden.shape[0]):  # exact GELU, x * Phi(x)
                hidden[j] = 0.5 * hidden[j] * (1.0 + math.erf(hidden[j] * _SQRT_HALF))
            _affine(hidden, down_t[layer, e], down_b[layer, e], f)
            # eq. (1) of bk.core, one position: g = 1 / (a - z - b c g_prev), a = H0_ii + v
            _affine(h, potential_t[layer], potential_b[layer], v)
            for c in range(channels):
                w = H0_DIAGONAL + v[c] - z[layer, c]
                if started:
                    w -= bc * g_prev[layer, r, c]
                g = 1.0 / w
                g_new[layer, r, c] = g
                mixed[c], mixed[channels + c] = g.real, g.imag
            gate = 1.0 / total
            for i in range(d):
                x[i] += f[i] * gate
            _affine(mixed, read_t[layer], read_b[layer], f)
            x += f
        _layer_norm(x, norm_w, norm_b, eps, h)
        _affine(h, head_t, head_b, logits[r])
    return -1


def _array(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous copy (never a view of the parameter: the kernel keeps a snapshot)."""
    return np.array(t.detach().cpu().numpy(), order="C", copy=True)


def _stack(tensors: list[torch.Tensor], transpose: bool = False) -> np.ndarray:
    return _array(torch.stack([t.mT if transpose else t for t in tensors]))


class _Weights(NamedTuple):
    """The kernel's arguments after ``tokens, g_prev, started``, in order. ``*_t`` are
    transposed (in, out) matrices; per-layer arrays lead with the layer, per-expert ones with
    (layer, expert)."""

    embed: np.ndarray
    ln_w: np.ndarray
    ln_b: np.ndarray
    router_t: np.ndarray
    router_b: np.ndarray
    up_t: np.ndarray
    up_b: np.ndarray
    down_t: np.ndarray
    down_b: np.ndarray
    potential_t: np.ndarray
    potential_b: np.ndarray
    z: np.ndarray
    read_t: np.ndarray
    read_b: np.ndarray
    norm_w: np.ndarray
    norm_b: np.ndarray
    head_t: np.ndarray
    head_b: np.ndarray


@dataclass(frozen=True)
class StepKernel:
    """``LanguageModel.step`` for inference, as one compiled call per step (see module doc)."""

    weights: _Weights
    eps: float
    dtype: torch.dtype  # of the weights and the logits
    complex_dtype: torch.dtype  # of the state, as LanguageModel.step makes it

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """True for a plain ``LanguageModel`` (subclasses may change ``step``)."""
        return type(model) is LanguageModel

    @classmethod
    def of(cls, model: LanguageModel) -> StepKernel:
        if not cls.supports(model):
            raise TypeError(f"StepKernel computes LanguageModel.step; got "
                            f"{type(model).__name__}, whose step may differ")
        dtypes = {p.dtype for p in model.parameters()}
        dtype = dtypes.pop()
        if dtypes or dtype not in (torch.float32, torch.float64):
            raise TypeError(f"StepKernel needs all weights in float32 or all in float64, got "
                            f"{sorted(map(str, dtypes | {dtype}))}")
        blocks = list(model.blocks)
        experts = [list(b.moe.experts) for b in blocks]
        norms = {b.norm.eps for b in blocks} | {model.norm.eps}
        if len(norms) != 1:
            raise ValueError(f"StepKernel needs one LayerNorm eps throughout, got {sorted(norms)}")
        with torch.no_grad():
            weights = _Weights(
                _array(model.embed.weight),
                _stack([b.norm.weight for b in blocks]),
                _stack([b.norm.bias for b in blocks]),
                _stack([b.moe.router.weight for b in blocks], transpose=True),
                _stack([b.moe.router.bias for b in blocks]),
                _stack([torch.stack([e.up.weight.mT for e in es]) for es in experts]),
                _stack([torch.stack([e.up.bias for e in es]) for es in experts]),
                _stack([torch.stack([e.down.weight.mT for e in es]) for es in experts]),
                _stack([torch.stack([e.down.bias for e in es]) for es in experts]),
                _stack([b.potential.weight for b in blocks], transpose=True),
                _stack([b.potential.bias for b in blocks]),
                _stack([b.shift() for b in blocks]),
                _stack([b.readout.weight for b in blocks], transpose=True),
                _stack([b.readout.bias for b in blocks]),
                _array(model.norm.weight),
                _array(model.norm.bias),
                _array(model.head.weight.mT),
                _array(model.head.bias),
            )
        return cls(weights, norms.pop(), dtype, torch.from_numpy(weights.z).dtype)

    def __call__(self, tokens: torch.Tensor, state: DecodeState
                 ) -> tuple[torch.Tensor, DecodeState]:
        """Logits ``(B, V)`` for the next token after ``tokens`` ``(B,)``, and the new state."""
        if tokens.dtype != torch.int64 or tokens.dim() != 1 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must be a non-empty 1-D int64 tensor, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        w = self.weights
        layers, channels = w.z.shape
        vocab = w.embed.shape[0]
        if len(state.g) != layers:
            raise ValueError(f"the state has {len(state.g)} layers, the model {layers}")
        batch = tokens.shape[0]
        started = state.g[0] is not None
        if started:
            for g in state.g:
                if g is None or g.shape != (batch, channels) or g.dtype != self.complex_dtype:
                    held = "nothing" if g is None else f"{tuple(g.shape)} {g.dtype}"
                    raise ValueError(f"the state holds {held} in a layer, expected "
                                     f"{(batch, channels)} {self.complex_dtype}")
            g_prev = torch.stack(state.g).detach()
        else:
            g_prev = torch.empty((0, 0, 0), dtype=self.complex_dtype)
        logits = torch.empty((batch, vocab), dtype=self.dtype)
        g_new = torch.empty((layers, batch, channels), dtype=self.complex_dtype)
        bad = _step(tokens.contiguous().numpy(), g_prev.numpy(), started, *w, self.eps,
                    logits.numpy(), g_new.numpy())
        if bad >= 0:
            raise ValueError(f"token ids must lie in [0, {vocab}), got {int(tokens[bad])}")
        return logits, DecodeState(g_new.unbind(0), state.position + 1)
