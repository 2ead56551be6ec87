"""Mixture-of-experts feed-forward with top-1 (switch) routing and sparse dispatch.

Each token goes to the expert with the highest router probability; the expert's output is
scaled by that probability, so the router is trained through its gate weights (the research
code used the argmax alone and its router never received a gradient). The load-balancing
loss is the switch-transformer auxiliary loss  E * sum_e f_e * P_e  (Fedus et al. 2021, eq. 4),
where f_e is the share of tokens sent to expert e and P_e the mean router probability of e.

Dispatch, for T tokens of width d:

1. group: a counting sort of the tokens by expert (one O(T) pass), so that expert e owns the
   contiguous block of sorted rows ``offsets[e-1]:offsets[e]``;
2. gather: the sorted rows, each followed by a 1 and zeros up to a multiple of 16 bytes, so
   that the expert's up-projection bias rides in its matrix product as one more weight row;
3. experts: each layer of all experts is one grouped matrix product over those blocks
   (``torch._grouped_mm``); the block bounds stay a tensor, nothing is read on the host;
4. combine: ``into[token] += gate * (y + down bias)`` for every sorted row, in one pass.

Steps 1, 2 and 4 are numba kernels (one pass each instead of 3-6 torch operations and their
temporaries; without gradients 2 also sorts the gates); 2 and 4 are autograd functions whose
backward passes are plain torch. Without gradients the router's maximum over the experts is a
kernel too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import nn
from torch.nn import functional as F

_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
_FLOATS = (torch.float32, torch.float64)


class Expert(nn.Module):
    """A two-layer GELU feed-forward network."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


StackedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # see stacked_weights


@dataclass
class Routing:
    """A routing decision for a flat set of tokens: expert index and gate weight per token."""

    expert: torch.Tensor  # (T,) int64
    gate: torch.Tensor  # (T,) router probability of the chosen expert
    probs: torch.Tensor  # (T, E) full router distribution


@dataclass
class ExpertGroups:
    """Tokens sorted by expert (stably): sorted row i is token ``order[i]`` (token t is sorted
    row ``slot[t]``), and rows ``offsets[e-1]:offsets[e]`` (from row 0 for e = 0) are the
    tokens of expert e."""

    order: torch.Tensor  # (T,) int64
    slot: torch.Tensor  # (T,) int64, the inverse permutation of order
    expert: torch.Tensor  # (T,) int64, expert of each sorted row
    offsets: torch.Tensor  # (E,) int32, cumulative token counts
    gate: torch.Tensor  # (T,) gate weight of each sorted row


# --------------------------------------------------------------------------------------------
# Kernels (C-contiguous arrays)
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _top(probs, gate, expert):
    """For each token (column of ``probs`` (E, T)), the largest probability and its expert, the
    first of equal ones, as ``probs.max(dim=0)`` gives them (a NaN is the largest). Expert by
    expert over contiguous rows, so that the comparisons run in SIMD lanes."""
    for t in range(probs.shape[1]):
        gate[t], expert[t] = probs[0, t], 0
    for e in range(1, probs.shape[0]):
        for t in range(probs.shape[1]):
            v, top = probs[e, t], gate[t]
            take = top == top and (v > top or v != v)
            gate[t] = v if take else top
            expert[t] = e if take else expert[t]


@njit(**_JIT)
def _group(expert, n_experts, order, slot, sorted_expert, offsets):
    """Counting sort of ``expert``; returns the first token with an invalid expert, or -1."""
    counts = np.zeros(n_experts, np.int64)
    for t in range(expert.shape[0]):
        e = expert[t]
        if e < 0 or e >= n_experts:
            return t
        counts[e] += 1
    start = np.empty(n_experts, np.int64)
    total = 0
    for e in range(n_experts):
        start[e] = total
        total += counts[e]
        offsets[e] = total
    for t in range(expert.shape[0]):
        e = expert[t]
        i = start[e]
        order[i] = t
        slot[t] = i
        sorted_expert[i] = e
        start[e] = i + 1
    return -1


@njit(**_JIT)
def _gather(x, slot, out, gate, sorted_gate):
    """``out[slot[t]] = [x[t], 1, 0, ..., 0]``, and ``sorted_gate[slot[t]] = gate[t]`` unless
    gate is None. In token order, so that only the rows of out are written out of order (55 us
    against 99 for reading the rows of x in sorted order, 4096 x 64 float32 in cache)."""
    d = x.shape[1]
    for t in range(slot.shape[0]):
        i = slot[t]
        if gate is not None:
            sorted_gate[i] = gate[t]
        for j in range(d):
            out[i, j] = x[t, j]
        out[i, d] = 1.0
        for j in range(d + 1, out.shape[1]):
            out[i, j] = 0.0


@njit(**_JIT)
def _combine(y, gate, bias, slot, expert, residual, out):
    """For token t, sorted row i = slot[t], with f_i = gate[i] (y[i] + bias[expert[i]]):
    ``out[t] += residual[t] + f_i``, or ``out[t] = f_i`` if ``residual`` is empty. (With
    ``out = m``, ``m + (x + f)`` is ``x + f + m`` exactly: floating-point sums commute.) In
    token order, so that only the rows of y are read out of order."""
    add = residual.shape[0] > 0
    for t in range(slot.shape[0]):
        i = slot[t]
        g, b = gate[i], bias[expert[i]]
        for j in range(y.shape[1]):
            f = g * (y[i, j] + b[j])
            if add:
                out[t, j] += residual[t, j] + f
            else:
                out[t, j] = f


def _array(t: torch.Tensor) -> np.ndarray:
    return (t.detach() if t.requires_grad else t).contiguous().numpy()


def _padded_width(d: int) -> int:
    """d + 1 (the bias column) rounded up to a multiple of 4 elements (16 bytes in float32)."""
    return (d + 4) // 4 * 4


def _gather_rows(x: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' input rows (see _gather), and ``gate`` in sorted order if given."""
    out = x.new_empty(slot.shape[0], _padded_width(x.shape[1]))
    sorted_gate = None if gate is None else gate.new_empty(slot.shape[0])
    _gather(_array(x), _array(slot), out.numpy(), None if gate is None else _array(gate),
            None if gate is None else sorted_gate.numpy())
    return out, sorted_gate


def _combine_rows(y, gate, bias, slot, expert, residual, mixed) -> torch.Tensor:
    if residual is None:
        out, residual = y.new_empty(y.shape), y.new_empty(0, 0)
    else:
        out = mixed  # of any shape with rows (T, d) in memory, filled in place
    _combine(_array(y), _array(gate), _array(bias), _array(slot), _array(expert),
             _array(residual), out.numpy().reshape(y.shape))
    return out


# Autograd functions around the kernels; without gradients the kernels run without them (an
# autograd function's call costs as much as a kernel on a thousand rows).


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot):
        ctx.save_for_backward(slot)
        ctx.width = x.shape[1]
        return _gather_rows(x, slot)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors  # token t is sorted row slot[t]: a permutation
        return grad[:, :ctx.width].index_select(0, slot), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gate, bias, order, slot, expert, residual, mixed):
        if residual is not None:
            ctx.mark_dirty(mixed)
            ctx.residual_shape = residual.shape
        out = _combine_rows(y, gate, bias, slot, expert, residual, mixed)
        ctx.save_for_backward(y, gate, bias, order, expert)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, gate, bias, order, expert = ctx.saved_tensors
        rows = grad.reshape(y.shape).index_select(0, order)  # gradient of each sorted row
        grad_y = rows * gate[:, None]
        grad_gate = (rows * (y + bias.index_select(0, expert))).sum(dim=1)
        grad_bias = torch.zeros_like(bias).index_add_(0, expert, grad_y)
        grad_residual = grad.view(ctx.residual_shape) if ctx.needs_input_grad[6] else None
        grad_mixed = grad if ctx.needs_input_grad[7] else None
        return grad_y, grad_gate, grad_bias, None, None, None, grad_residual, grad_mixed


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row block e of ``x`` ``(T, K)`` (rows ``offsets[e-1]:offsets[e]``) times ``weight[e]``
    ``(K, M)``; returns ``(T, M)``.

    ``torch._grouped_mm`` does this in one call, with gradients, for float32/bfloat16/float16
    rows of a multiple of 16 bytes. Other inputs (the float64 test models) run the blocks one
    by one, which reads the offsets on the host.
    """
    aligned = all(x.element_size() * size % 16 == 0 for size in (x.shape[1], weight.shape[2]))
    if aligned and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch._grouped_mm(x.contiguous(), weight, offs=offsets)
    bounds = [0, *offsets.tolist()]
    return torch.cat([x[start:end] @ w for w, start, end in zip(weight, bounds[:-1], bounds[1:],
                                                                 strict=True)])


class MoEFeedForward(nn.Module):
    """Top-1 mixture of experts over flattened tokens ``(T, d_model)``."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(d_model, n_experts)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        self._stacked: tuple[list[int], StackedWeights] | None = None

    def route(self, x: torch.Tensor) -> Routing:
        logits = torch.addmm(self.router.bias[:, None], self.router.weight, x.mT)
        return self.route_logits(logits)

    def route_logits(self, logits: torch.Tensor) -> Routing:
        """Routing from router logits laid out ``(E, T)``: the softmax and the maximum then run
        over the leading axis, across contiguous rows of T (over a trailing axis of a few
        experts they are ~10x slower)."""
        probs = torch.softmax(logits, dim=0)
        if (torch.is_grad_enabled() and probs.requires_grad) or probs.dtype not in _FLOATS:
            gate, expert = probs.max(dim=0)
        else:  # torch's maximum over a short leading axis costs twice the softmax
            gate = probs.new_empty(probs.shape[1])
            expert = torch.empty(probs.shape[1], dtype=torch.int64)
            _top(_array(probs), gate.numpy(), expert.numpy())
        return Routing(expert=expert, gate=gate, probs=probs.mT)

    def sort(self, x: torch.Tensor, routing: Routing) -> tuple[ExpertGroups, torch.Tensor]:
        """The tokens grouped by expert, and ``x`` ``(T, d)``'s rows in that order as the
        experts' input (see module doc)."""
        expert, gate = routing.expert, routing.gate
        order, slot, sorted_expert = torch.empty(3, expert.shape[0], dtype=expert.dtype)
        offsets = torch.empty(self.n_experts, dtype=torch.int32)
        bad = _group(_array(expert), self.n_experts, order.numpy(), slot.numpy(),
                     sorted_expert.numpy(), offsets.numpy())
        if bad >= 0:
            raise ValueError(f"routing.expert must lie in [0, {self.n_experts}), got "
                             f"{int(expert[bad])} at token {bad}")
        if torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad):
            sorted_gate = gate.index_select(0, order)
            rows = _GatherRows.apply(x, slot) if x.requires_grad else _gather_rows(x, slot)[0]
        else:  # the gates sorted in the gather's pass
            rows, sorted_gate = _gather_rows(x, slot, gate)
        return ExpertGroups(order, slot, sorted_expert, offsets, sorted_gate), rows

    def stacked_weights(self) -> StackedWeights:
        """The experts' weights as grouped products take them: up ``(E, d + 1 + pad, H)`` for
        the gathered rows ``[x, 1, 0, ...]`` (bias included), down ``(E, H, d)``, down biases
        ``(E, d)``.

        They are copies, of the size of all experts, which a call on a few tokens would spend
        most of its time making. Without autograd they are therefore kept and made again only
        when an expert parameter has changed: been replaced (another address) or changed in
        place (its version counter, which autograd checks its saved tensors by).
        """
        if torch.is_grad_enabled():
            return self._stack_weights()
        # the parameters the modules hold now (up weight and bias, down weight and bias), read
        # from their dictionaries: nn.Module attribute lookups were most of this check's cost,
        # and a flat list built in plain loops costs half a tuple of pairs from a generator
        key = []
        for e in self.experts._modules.values():
            for layer in e._modules.values():
                for p in layer._parameters.values():
                    key.append(p.data_ptr())
                    key.append(p._version)
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, self._stack_weights())
        return self._stacked[1]

    def _stack_weights(self) -> StackedWeights:
        hidden_width, d = self.experts[0].up.weight.shape
        weight = self.experts[0].up.weight
        zeros = weight.new_zeros(hidden_width, _padded_width(d) - d - 1)
        # [W_e, b_e, 0] side by side in one copy; expert e's weight is a column-major view of it
        up = torch.cat([t for e in self.experts for t in (e.up.weight, e.up.bias[:, None], zeros)],
                       dim=1).view(hidden_width, self.n_experts, -1).permute(1, 2, 0)
        down = torch.stack([e.down.weight for e in self.experts]).mT
        return up, down, torch.stack([e.down.bias for e in self.experts])

    def expert_outputs(self, x: torch.Tensor, groups: ExpertGroups, *,
                       weights: StackedWeights | None = None) -> torch.Tensor:
        """Each expert on its block of the gathered tokens; ungated, without the down bias.
        ``weights``: ``stacked_weights()`` if the caller has them."""
        up, down, _ = weights or self.stacked_weights()
        hidden = grouped_mm(x, up, groups.offsets)
        # in place unless autograd records it: a (T, d_hidden) buffer less to allocate
        hidden = F.gelu(hidden) if hidden.requires_grad else torch._C._nn.gelu_(hidden)
        return grouped_mm(hidden, down, groups.offsets)

    def combine(self, y: torch.Tensor, groups: ExpertGroups,
                residual: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                weights: StackedWeights | None = None) -> torch.Tensor:
        """The gated expert outputs ``f`` ``(T, d)`` in token order, from ``y`` (sorted rows,
        see ``expert_outputs``) and the down bias; with ``residual = (x, m)``, ``x + f + m``
        (exactly as torch sums it), in the same pass and in place of ``m``."""
        _, _, down_bias = weights or self.stacked_weights()
        x, m = residual or (None, None)
        if m is not None and (m._is_view() or not m.is_contiguous()):
            m = m.clone(memory_format=torch.contiguous_format)  # written in place below
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (y, groups.gate, down_bias, x, m)):
            return _Combine.apply(y, groups.gate, down_bias, groups.order, groups.slot,
                                  groups.expert, x, m)
        return _combine_rows(y, groups.gate, down_bias, groups.slot, groups.expert, x, m)

    def dispatch(self, x: torch.Tensor, routing: Routing,
                 residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Run each expert only on the tokens routed to it; gated outputs ``f`` in token order,
        or ``x + f + m`` for ``residual = (x, m)`` (see ``combine``)."""
        groups, rows = self.sort(x, routing)
        weights = self.stacked_weights()  # once: checking the kept copies costs ~20 us
        y = self.expert_outputs(rows, groups, weights=weights)
        return self.combine(y, groups, residual, weights=weights)

    def balance_loss(self, routing: Routing, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The switch loss over the tokens, or over the tokens where ``valid`` ``(T,)`` bool is
        true (the others, padding that ran only to keep shapes static, count for nothing; no
        valid token gives 0)."""
        tokens = routing.expert.numel()
        if tokens == 0:
            return routing.probs.new_zeros(())
        probs = routing.probs
        if valid is None:
            load = probs.new_zeros(self.n_experts).index_add_(
                0, routing.expert, probs.new_ones(()).expand(tokens))
            return self.n_experts * (load / tokens * probs.mean(dim=0)).sum()
        weight = valid.to(probs.dtype)
        count = weight.sum().clamp(min=1)
        load = probs.new_zeros(self.n_experts).index_add_(0, routing.expert, weight)
        return self.n_experts * (load / count * (weight @ probs / count)).sum()

    def forward(self, x: torch.Tensor, residual: tuple[torch.Tensor, torch.Tensor] | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (output, load-balancing loss); expert calls equal the number of tokens. With
        ``residual``, the output is ``x + f + m`` (see ``dispatch``). ``valid`` ``(T,)`` bool
        marks the tokens the balance loss counts (default: all).

        The balance loss is a training term: in eval mode it is not computed and is 0.
        """
        routing = self.route(x)
        balance = self.balance_loss(routing, valid) if self.training else x.new_zeros(())
        return self.dispatch(x, routing, residual), balance
