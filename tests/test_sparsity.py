"""Properties of learned per-position sparsity."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.sparsity import SparseLanguageModel, carry_previous, compute_mask, sparse_block
from bk.model import BKBlock, LanguageModel, ModelConfig

CFG = ModelConfig(vocab_size=17, d_model=16, n_layers=3, n_seq=16, n_experts=2, d_expert=16,
                  bk_channels=2)
seeds = st.integers(0, 2**31 - 1)


def block_and_input(seed: int, batch: int, length: int) -> tuple[BKBlock, torch.Tensor]:
    torch.manual_seed(seed)
    return BKBlock(CFG).double(), torch.randn(batch, length, CFG.d_model, dtype=torch.float64)


def random_mask(seed: int, batch: int, length: int, p: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, length, generator=g) < p).double()


def reference_block(block: BKBlock, x: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense computation on every position, then the fill: feed-forward 0 and the potential
    of the last computed position before (0 if none) at skipped positions. Python loops."""
    b, n, d = x.shape
    computed = mask.detach() == 1
    h = block.norm(x)
    f_all, _ = block.moe(h.reshape(b * n, d))
    v_all = block.potential(h)
    m = mask * computed
    f = m[..., None] * f_all.view(b, n, d)
    rows = []
    for i in range(b):
        carry, out = torch.zeros_like(v_all[i, 0]), []
        for t in range(n):
            out.append(m[i, t] * v_all[i, t] + (1 - m[i, t]) * carry)
            if computed[i, t]:
                carry = v_all[i, t]
        rows.append(torch.stack(out))
    v = torch.stack(rows)
    routing = block.moe.route(h.reshape(b * n, d)[computed.reshape(-1)])
    return x + f + block.mix(block.resolvent(v)), block.moe.balance_loss(routing)


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_an_all_ones_mask_reproduces_the_dense_block_exactly(batch, length, seed):
    block, x = block_and_input(seed, batch, length)
    expected, expected_balance = block(x)
    got, balance, computed = sparse_block(block, x, torch.ones(batch, length,
                                                               dtype=torch.float64))
    assert torch.equal(got, expected)
    assert torch.equal(balance, expected_balance)
    assert computed == batch * length


@given(batch=st.integers(1, 3), length=st.integers(1, 12), p=st.floats(0, 1), seed=seeds)
def test_sparse_block_forward_and_backward_equal_the_dense_reference_with_the_same_fill(
        batch, length, p, seed):
    block, x = block_and_input(seed, batch, length)
    hard = random_mask(seed, batch, length, p)
    results = []
    for run in (sparse_block, reference_block):
        block.zero_grad()
        xg = x.clone().requires_grad_()
        soft = torch.full_like(hard, 0.3, requires_grad=True)  # straight-through mask
        out, balance, *_ = run(block, xg, hard + (soft - soft.detach()))
        (out.square().sum() + balance).backward()
        grads = [xg.grad, soft.grad] + [q.grad if q.grad is not None else torch.zeros_like(q)
                                        for q in block.parameters()]
        results.append((out.detach(), balance.detach(), grads))
    (out, balance, grads), (ref_out, ref_balance, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(balance, ref_balance, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_per_position_work_runs_only_on_computed_positions(batch, length, seed):
    block, x = block_and_input(seed, batch, length)
    mask = random_mask(seed, batch, length)
    rows = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
             for m in (block.norm, block.moe, block.potential)]
    try:
        _, _, computed = sparse_block(block, x, mask)
    finally:
        for h in hooks:
            h.remove()
    expected = int(mask.sum())
    assert computed == expected
    assert rows == ([expected] * 3 if expected else [])


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_a_fully_masked_input_gives_finite_outputs_and_carries_nothing(batch, length, seed):
    block, x = block_and_input(seed, batch, length)
    out, balance, computed = sparse_block(block, x, torch.zeros(batch, length,
                                                                dtype=torch.float64))
    assert computed == 0 and float(balance) == 0
    assert bool(torch.isfinite(out).all())
    free = block.mix(block.resolvent(torch.zeros(batch, length, CFG.bk_channels,
                                                 dtype=torch.float64)))
    torch.testing.assert_close(out, x + free, rtol=0, atol=0)


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_carry_is_the_value_at_the_last_computed_position_before(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, length, 2, dtype=torch.float64, generator=g)
    computed = random_mask(seed, batch, length) == 1
    carried = carry_previous(values, computed)
    for i in range(batch):
        for t in range(length):
            before = [s for s in range(t) if computed[i, s]]
            expected = values[i, before[-1]] if before else torch.zeros(2, dtype=torch.float64)
            assert torch.equal(carried[i, t], expected)


def sparse_model(seed: int, weight_scale: float = 1.0, **options) -> SparseLanguageModel:
    """A float64 sparse model whose predictors are random, so masks vary by position."""
    torch.manual_seed(seed)
    model = SparseLanguageModel(CFG, **options).double()
    with torch.no_grad():
        for predictor in model.importance:
            predictor.weight.normal_(std=weight_scale)
            predictor.bias.normal_()
    return model.eval()


def tokens(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_the_model_equals_the_reference_and_reports_the_sparsity_of_its_masks(batch, length,
                                                                               seed):
    model = sparse_model(seed)
    idx = tokens(seed, batch, length)
    with torch.no_grad():
        out = model(idx)
        x = model.embed(idx)
        computed_layers = torch.zeros(batch, length, dtype=torch.float64)
        for block, predictor in zip(model.blocks, model.importance, strict=True):
            mask = (predictor(x).squeeze(-1) > 0).double()
            x, _ = reference_block(block, x, mask)
            computed_layers += mask
    torch.testing.assert_close(out.logits, model.head(model.norm(x)), rtol=1e-10, atol=1e-10)
    assert torch.equal(out.stats["layers_per_token"], computed_layers)
    assert torch.equal(out.stats["sparsity"], 1 - computed_layers / CFG.n_layers)
    assert out.work.token_layers == out.work.expert_calls == int(computed_layers.sum())
    assert out.work.positions == batch * length * CFG.n_layers


@given(length=st.integers(2, 16), data=st.data(), seed=seeds)
def test_no_position_sees_a_later_token(length, data, seed):
    model = sparse_model(seed)
    cut = data.draw(st.integers(0, length - 2), label="last unperturbed position")
    idx = tokens(seed, 2, length)
    changed = idx.clone()
    changed[:, cut + 1:] = (idx[:, cut + 1:] + 1) % CFG.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after.logits[:, :cut + 1], before.logits[:, :cut + 1],
                               rtol=1e-10, atol=1e-10)
    assert torch.equal(after.stats["sparsity"][:, :cut + 1], before.stats["sparsity"][:, :cut + 1])
    assert not torch.allclose(after.logits[:, cut + 1], before.logits[:, cut + 1])


@given(length=st.integers(1, 12), seed=seeds)
def test_evaluation_is_deterministic(length, seed):
    model = sparse_model(seed)
    idx = tokens(seed, 2, length)
    first, second = model(idx), model(idx)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.stats["sparsity"], second.stats["sparsity"])


def test_a_model_that_computes_everywhere_is_the_dense_model():
    torch.manual_seed(0)
    dense = LanguageModel(CFG).double().eval()
    model = SparseLanguageModel(CFG).double().eval()
    model.load_state_dict(dense.state_dict(), strict=False)  # predictors: logit 3, compute
    idx = tokens(0, 3, 16)
    got, expected = model(idx), dense(idx)
    assert torch.equal(got.logits, expected.logits)
    assert got.work == expected.work
    assert float(got.stats["sparsity"].max()) == 0


def test_dense_weights_load_under_the_same_names():
    result = SparseLanguageModel(CFG).load_state_dict(LanguageModel(CFG).state_dict(),
                                                      strict=False)
    assert result.unexpected_keys == []
    assert all(key.startswith("importance.") for key in result.missing_keys)


def test_the_training_mask_is_hard_with_a_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.zeros(20000, dtype=torch.float64, requires_grad=True)
    mask = compute_mask(logits, training=True)
    assert bool(((mask == 0) | (mask == 1)).all())
    assert abs(float(mask.mean()) - 0.5) < 0.02  # P(compute) = sigmoid(logit) = 0.5
    mask.sum().backward()
    assert bool((logits.grad > 0).all()) and bool((logits.grad <= 0.25).all())  # sigmoid'
    evaluation = compute_mask(torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 2.0]), training=False)
    assert evaluation.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_the_task_loss_gradient_reaches_every_predictor():
    cfg = ModelConfig(**{**CFG.__dict__, "balance_weight": 0.0})
    torch.manual_seed(0)
    model = SparseLanguageModel(cfg, sparsity_weight=0.0).double().train()
    with torch.no_grad():
        for predictor in model.importance:
            predictor.bias.zero_()  # about half the positions compute
    idx = tokens(0, 4, 16)
    model(idx, idx).loss.backward()
    for predictor in model.importance:
        assert float(predictor.weight.grad.abs().sum()) > 0


def test_the_sparsity_loss_pulls_the_skip_rate_towards_the_target():
    torch.manual_seed(0)
    model = SparseLanguageModel(CFG, target_sparsity=0.75).double().train()  # skips ~5%
    idx = tokens(0, 4, 16)
    out = model(idx, idx)
    (out.loss - out.ce).backward()
    for predictor in model.importance:
        assert float(predictor.bias.grad) > 0  # descending lowers the logit: more skipping


def test_the_schedule_ramps_the_target_from_zero_over_the_first_half():
    model = SparseLanguageModel(CFG, target_sparsity=0.6)
    seen = []
    for progress in (0.0, 0.25, 0.5, 0.9, 1.0):
        model.schedule(progress)
        seen.append(model.current_target)
    assert seen == pytest.approx([0.0, 0.3, 0.6, 0.6, 0.6])
    with pytest.raises(ValueError, match="progress"):
        model.schedule(1.5)


@pytest.mark.parametrize("mask", [torch.full((2, 4), 0.5), torch.full((2, 4), float("nan")),
                                  torch.ones(2, 3)])
def test_a_bad_mask_raises_a_clear_error(mask):
    block, x = block_and_input(0, 2, 4)
    with pytest.raises(ValueError, match="mask"):
        sparse_block(block.float(), x.float(), mask)


@pytest.mark.parametrize(("options", "message"), [
    ({"target_sparsity": 1.0}, "target_sparsity"), ({"target_sparsity": -0.1}, "target_sparsity"),
    ({"sparsity_weight": -1.0}, "sparsity_weight")])
def test_bad_settings_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SparseLanguageModel(CFG, **options)
