"""The one skip primitive (bk/skip.py): subsets of tokens and a block run on them."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.model import BKBlock
from bk.skip import Subset, run_block, step_block
from tests.strategies import TINY as CFG
from tests.strategies import seeds

F64 = torch.float64


@st.composite
def masks(draw, max_batch: int = 3, max_len: int = 12) -> torch.Tensor:
    b = draw(st.integers(1, max_batch))
    n = draw(st.integers(1, max_len))
    bits = draw(st.lists(st.booleans(), min_size=b * n, max_size=b * n))
    return torch.tensor(bits, dtype=torch.bool).view(b, n)


def first_k_reference(select: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` selected positions of each row, by a plain loop."""
    ran = torch.zeros_like(select)
    for row in range(select.shape[0]):
        taken = 0
        for i in range(select.shape[1]):
            if select[row, i] and taken < k:
                ran[row, i] = True
                taken += 1
    return ran


def subsets(mask: torch.Tensor, kind: str, k: int) -> Subset:
    return Subset.where(mask.reshape(-1)) if kind == "where" else Subset.capacity(mask, k)


def expected_mask(mask: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    return mask if kind == "where" else first_k_reference(mask, k)


kinds = st.sampled_from(["where", "capacity"])


@given(masks(), kinds, st.integers(0, 12), seeds)
def test_gather_then_scatter_puts_every_row_back_where_it_came_from(mask, kind, k, seed):
    k = min(k, mask.shape[1])
    subset = subsets(mask, kind, k)
    ran = expected_mask(mask, kind, k).reshape(-1)
    assert torch.equal(subset.mask(), ran)
    x = torch.randn(mask.numel(), 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert torch.equal(subset.scatter(torch.zeros_like(x), subset.gather(x))[ran], x[ran])
    assert torch.equal(subset.scatter(x, subset.gather(x)), x)  # order restored
    rows = torch.randn(subset.size, 3, dtype=F64)
    out = subset.scatter(x, rows)
    assert torch.equal(out[~ran], x[~ran])  # rows that did not run pass through
    added = subset.add(x, rows)
    assert torch.equal(added[~ran], x[~ran])
    assert torch.allclose(added[ran] - x[ran], out[ran])


@given(st.integers(0, 6), st.booleans(), seeds)
def test_a_subset_of_every_row_reads_and_writes_every_row_in_order(total, by_mask, seed):
    subset = (Subset.where(torch.ones(total, dtype=torch.bool)) if by_mask
              else Subset.all(total))
    assert subset.every_row and torch.equal(subset.index, torch.arange(total))
    x, rows = torch.randn(2, total, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert torch.equal(subset.gather(x), x)
    assert torch.equal(subset.scatter(x, rows), rows)
    assert torch.equal(subset.add(x, rows), x + rows)
    assert torch.equal(subset.mask(), torch.ones(total, dtype=torch.bool))


@given(masks(), st.integers(0, 12))
def test_a_capacity_subset_has_a_static_size_and_keeps_the_first_k_selected(mask, k):
    k = min(k, mask.shape[1])
    subset = Subset.capacity(mask, k)
    assert subset.size == mask.shape[0] * k
    assert torch.equal(subset.mask().view_as(mask), first_k_reference(mask, k))


@given(masks(), st.integers(0, 12), st.integers(0, 11))
def test_whether_a_position_runs_under_capacity_depends_on_earlier_decisions_only(mask, k, i):
    k, i = min(k, mask.shape[1]), min(i, mask.shape[1] - 1)
    changed = mask.clone()
    changed[:, i + 1:] = ~changed[:, i + 1:]
    before = Subset.capacity(mask, k).mask().view_as(mask)[:, :i + 1]
    after = Subset.capacity(changed, k).mask().view_as(mask)[:, :i + 1]
    assert torch.equal(before, after)


def test_subsets_reject_malformed_decisions_with_clear_errors():
    with pytest.raises(ValueError, match="1-D bool"):
        Subset.where(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="capacity k"):
        Subset.capacity(torch.ones(2, 3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="rows"):
        Subset.all(3).gather(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="shape"):
        Subset.all(3).scatter(torch.zeros(3, 2), torch.zeros(2, 2))


def block_and_input(seed: int, b: int, n: int, dtype: torch.dtype = F64
                    ) -> tuple[BKBlock, torch.Tensor]:
    torch.manual_seed(seed)
    block = BKBlock(CFG).to(dtype)
    for p in block.parameters():  # away from the initial values, so every term matters
        p.data.add_(0.1 * torch.randn_like(p))
    return block, torch.randn(b, n, CFG.d_model, dtype=dtype, requires_grad=True)


def gradients(value: torch.Tensor, params: list[torch.Tensor]) -> tuple:
    """d value / d params; None for a parameter (or a value) not on the graph."""
    if not value.requires_grad:
        return (None,) * len(params)
    return torch.autograd.grad(value, params, allow_unused=True)


def assert_same_gradients(got: tuple, want: tuple) -> None:
    """Equal gradients, None counting as zero."""
    for a, e in zip(got, want, strict=True):
        if a is None or e is None:
            assert a is None or not a.any()
            assert e is None or not e.any()
        else:
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def placement(subset: Subset) -> torch.Tensor:
    """``(total, K)``: 1 where entry ``t`` is real row ``r`` (padding has no row), by a loop."""
    out = torch.zeros(subset.total, subset.size, dtype=F64)
    for t, row in enumerate(subset.index.tolist()):
        if subset.valid is None or subset.valid[t]:
            out[row, t] = 1.0
    return out


def carry_loop(v: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
    """The potential of the last position strictly before each one that ran, by a loop."""
    out = torch.zeros_like(v)
    for row in range(v.shape[0]):
        last = None
        for i in range(v.shape[1]):
            if last is not None:
                out[row, i] = v[row, last]
            if ran[row, i]:
                last = i
    return out


def masked_dense(block: BKBlock, x: torch.Tensor, ran: torch.Tensor, fill: str, readout: str,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
    """The block computed densely on every row, then masked: what run_block must equal."""
    b, n, d = x.shape
    f, v, _ = block.token_work(x.reshape(b * n, d))
    f, v = f.view(b, n, d), v.view(b, n, -1)
    keep = ran[..., None]
    v = torch.where(keep, v, 0.0)
    fill_v = carry_loop(v, ran) if fill == "carry" else torch.zeros_like(v)
    g = gate.view(b, n, 1) if gate is not None else keep.to(x.dtype)
    v = g * v + (1 - g) * fill_v
    f = g * torch.where(keep, f, 0.0)
    mixed = block.mix(block.resolvent(v))
    return x + f + (mixed if readout == "all" else torch.where(keep, mixed, 0.0))


@given(masks(max_len=10), kinds, st.integers(0, 10), st.sampled_from(["zero", "carry"]),
       st.sampled_from(["ran", "all"]), seeds)
def test_a_block_on_a_subset_equals_the_masked_dense_block_in_value_and_gradient(
        mask, kind, k, fill, readout, seed):
    k = min(k, mask.shape[1])
    block, x = block_and_input(seed, *mask.shape)
    subset = subsets(mask, kind, k)
    ran = subset.mask().view_as(mask)
    out, _ = run_block(block, x, subset, fill=fill, readout=readout)
    ref = masked_dense(block, x, ran, fill, readout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(out)
    params = [x, *block.parameters()]
    assert_same_gradients(gradients((out * w).sum(), params), gradients((ref * w).sum(), params))


@given(st.integers(1, 3), st.integers(1, 10), st.booleans(), st.sampled_from(["zero", "carry"]),
       st.sampled_from(["ran", "all"]), st.sampled_from([torch.float32, F64]),
       seeds)
def test_a_block_on_every_row_is_the_dense_block_bit_for_bit(b, n, by_capacity, fill, readout,
                                                              dtype, seed):
    # Every row through Subset.all is the block itself; through a full capacity subset, the
    # one-pass kernels sum x + f + mix as the dense combine does.
    block, x = block_and_input(seed, b, n, dtype)
    block.train()
    subset = (Subset.capacity(torch.ones(b, n, dtype=torch.bool), n) if by_capacity
              else Subset.all(b * n))
    out, balance = run_block(block, x, subset, fill=fill, readout=readout)
    dense, dense_balance = block(x)
    assert torch.equal(out, dense)
    torch.testing.assert_close(balance, dense_balance, rtol=1e-6, atol=0)


@given(masks(max_len=10), kinds, st.integers(0, 10), seeds)
def test_the_balance_loss_counts_exactly_the_rows_that_ran_in_value_and_gradient(mask, kind, k,
                                                                                seed):
    # Padding rows of a capacity subset run (static shapes) but must not bias the loss.
    k = min(k, mask.shape[1])
    block, x = block_and_input(seed, *mask.shape)
    block.train()
    subset = subsets(mask, kind, k)
    ran = subset.mask()
    _, balance = run_block(block, x, subset)
    _, _, expected = block.token_work(x.reshape(-1, CFG.d_model)[ran])  # 0 if none ran
    torch.testing.assert_close(balance, expected, rtol=1e-12, atol=1e-14)
    params = [x, *block.parameters()]
    assert_same_gradients(gradients(balance, params), gradients(expected, params))


@given(masks(max_len=10), st.sampled_from(["zero", "carry"]), seeds)
def test_a_straight_through_gate_changes_no_value_and_carries_the_exact_gradient(
        mask, fill, seed):
    block, x = block_and_input(seed, *mask.shape)
    subset = Subset.where(mask.reshape(-1))
    gate = torch.ones(subset.size, dtype=F64, requires_grad=True)
    out, _ = run_block(block, x, subset, fill=fill, readout="all", gate=gate)
    plain, _ = run_block(block, x, subset, fill=fill, readout="all")
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    full_gate = torch.where(mask.reshape(-1), 1.0, 0.0).to(F64).requires_grad_()
    ref = masked_dense(block, x, mask, fill, "all", gate=full_gate)
    w = torch.randn_like(out)
    (got,) = torch.autograd.grad((out * w).sum(), gate)
    (want,) = torch.autograd.grad((ref * w).sum(), full_gate)
    torch.testing.assert_close(got, want[mask.reshape(-1)], rtol=1e-9, atol=1e-12)


@given(masks(max_len=10), kinds, st.integers(1, 10), st.booleans(), seeds)
def test_a_scaled_block_adds_the_scaled_update_to_the_rows_that_ran(mask, kind, k, scaled, seed):
    k = min(k, mask.shape[1])
    block, x = block_and_input(seed, *mask.shape)
    subset = subsets(mask, kind, k)
    ran = subset.mask().view_as(mask)
    scale = torch.rand(subset.size, dtype=F64, generator=torch.Generator().manual_seed(seed))
    scale.requires_grad_()
    out, _ = run_block(block, x, subset, scale=scale if scaled else None)
    full = (placement(subset) @ scale).view_as(mask)
    ref = masked_dense(block, x, ran, "zero", "ran")
    expected = x + (full[..., None] if scaled else 1) * (ref - x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(out)
    params = [x, scale, *block.parameters()]
    assert_same_gradients(gradients((out * w).sum(), params),
                          gradients((expected * w).sum(), params))


@given(masks(max_len=10), kinds, st.booleans(), seeds)
def test_stepping_positions_with_step_block_computes_what_run_block_computes(mask, kind, scaled,
                                                                           seed):
    # Per position a subset of the batch runs (capacity 1 of the position's own decisions, or
    # exactly the decided rows): the whole sequence run at once must give the same values.
    block, x = block_and_input(seed, *mask.shape)
    b, n = mask.shape
    scale = 0.5 + torch.rand(b, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    whole = Subset.where(mask.reshape(-1))
    out, _ = run_block(block, x, whole, scale=whole.gather(scale.reshape(-1)) if scaled else None)
    g = None
    for i in range(n):
        subset = subsets(mask[:, i:i + 1], kind, 1)
        rows = subset.gather(scale[:, i:i + 1].reshape(-1))
        stepped, g = step_block(block, x[:, i], subset, g, scale=rows if scaled else None)
        torch.testing.assert_close(stepped, out[:, i], rtol=1e-10, atol=1e-12)


def test_a_scale_needs_the_read_out_on_the_rows_that_ran():
    block, x = block_and_input(0, 1, 3)
    with pytest.raises(ValueError, match="readout 'ran'"):
        run_block(block, x, Subset.all(3), readout="all", scale=torch.ones(3, dtype=F64))
