"""Properties of learned per-position sparsity."""

import inspect
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bk.adaptive.sparsity import (
    SparseDecodeState,
    SparseLanguageModel,
    compute_mask,
    slots,
    strided,
)
from bk.model import BKBlock, DecodeState, LanguageModel
from bk.skip import carry_previous
from bk.technique import Forcing, KnobError
from tests.strategies import TINY as CFG
from tests.strategies import decode, float64_model, random_tokens, seeds

F64 = torch.float64
capacities = st.sampled_from([None, 0.25, 0.5, 1.0])


def random_mask(seed: int, batch: int, length: int, p: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, length, generator=g) < p).double()


def first_k(select: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` selected positions of each row, by a plain loop."""
    ran = torch.zeros_like(select)
    for row in range(select.shape[0]):
        taken = 0
        for i in range(select.shape[1]):
            if select[row, i] and taken < k:
                ran[row, i], taken = True, taken + 1
    return ran


def reference_block(block: BKBlock, x: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense computation on every position, then the fill: feed-forward 0 and the potential
    of the last computed position before (0 if none) at skipped positions. Python loops.
    ``mask`` is 1 where a position computes (it may carry a straight-through gradient)."""
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


def sparse_model(seed: int, weight_scale: float = 1.0, **knobs) -> SparseLanguageModel:
    """A float64 sparse model whose predictors are random, so decisions vary by position."""
    model = float64_model(seed, SparseLanguageModel, **knobs)
    with torch.no_grad():
        for predictor in model.importance:
            predictor.weight.normal_(std=weight_scale)
            predictor.bias.normal_()
    return model


def block_input(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randn(batch, length, CFG.d_model, dtype=F64,
                       generator=torch.Generator().manual_seed(seed))


def reference_model(model: SparseLanguageModel, idx: torch.Tensor,
                    decisions: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits, computed layers per token and the per-layer ran masks, layer by layer with
    :func:`reference_block`; the decisions are the predictors' (``logit > 0``, then the first
    ``ceil(capacity * n_seq)`` of them) unless given."""
    b, n = idx.shape
    x = model.embed(idx)
    computed_layers = torch.zeros(b, n, dtype=F64)
    masks = []
    for index, (block, predictor) in enumerate(zip(model.blocks, model.importance, strict=True)):
        if decisions is not None:
            ran = decisions[index]
        else:
            ran = predictor(x).squeeze(-1) > 0
            if model.capacity is not None:
                ran = first_k(ran, slots(model.capacity, CFG.n_seq))
        x, _ = reference_block(block, x, ran.double())
        computed_layers += ran
        masks.append(ran)
    return model.head(model.norm(x)), computed_layers, masks


def run(model: SparseLanguageModel, index: int, x: torch.Tensor):
    return model.sparse_block(index, model.blocks[index], x)


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_a_block_where_every_position_computes_is_the_dense_block(batch, length, seed):
    model = sparse_model(seed).train()
    with torch.no_grad():
        model.importance[0].bias.fill_(50.0)  # every Gumbel draw decides to compute
    x = block_input(seed, batch, length)
    out, terms, subset = run(model, 0, x)
    expected, expected_balance = model.blocks[0](x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["balance"], CFG.balance_weight * expected_balance)
    assert subset.size == batch * length


@given(batch=st.integers(1, 3), length=st.integers(1, 12), capacity=capacities, seed=seeds)
def test_a_training_block_equals_the_dense_reference_in_value_and_gradient(
        batch, length, capacity, seed):
    model = sparse_model(seed, capacity=capacity).train()
    model.schedule(0.25)  # target 0.5 * 0.25 / RAMP_FRACTION
    x = block_input(seed, batch, length)
    results = []
    for reference in (False, True):
        model.zero_grad()
        xg = x.clone().requires_grad_()
        torch.manual_seed(seed)  # the same Gumbel noise in both runs
        if reference:
            mask = compute_mask(model.importance[0](xg).squeeze(-1), training=True)
            ran = mask.detach() == 1
            if capacity is not None:
                ran = first_k(ran, min(slots(capacity, CFG.n_seq), length))
            out, balance = reference_block(model.blocks[0], xg, mask * ran)
            terms = {"balance": CFG.balance_weight * balance,
                     "sparsity": model.sparsity_weight * (1 - mask.mean() - 0.25) ** 2}
        else:
            out, terms, _ = run(model, 0, xg)
        if capacity is not None:  # padding rows enter the primitive's balance loss
            del terms["balance"]
        (out.square().sum() + sum(terms.values())).backward()
        grads = [xg.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                             for p in [*model.importance[0].parameters(),
                                       *model.blocks[0].parameters()]]
        results.append((out.detach(), {k: t.detach() for k, t in terms.items()}, grads))
    (out, terms, grads), (ref_out, ref_terms, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms, ref_terms, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@given(batch=st.integers(1, 3), length=st.integers(1, 12), capacity=capacities, seed=seeds)
def test_the_model_equals_the_reference_and_reports_what_ran(batch, length, capacity, seed):
    model = sparse_model(seed, capacity=capacity)
    idx = random_tokens(seed, batch, length)
    rows = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
             for block in model.blocks for m in (block.norm, block.moe, block.potential)]
    try:
        with torch.no_grad():
            out = model(idx)
            logits, computed_layers, masks = reference_model(model, idx)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.stats["layers_per_token"], computed_layers)
    assert torch.equal(out.stats["sparsity"], 1 - computed_layers / CFG.n_layers)
    if capacity is None:  # exactly the positions that decided to compute
        executed = [int(m.sum()) for m in masks]
    else:  # static: a slot per sequence for each of the first K decisions, used or not
        executed = [batch * min(slots(capacity, CFG.n_seq), length)] * CFG.n_layers
    assert rows[:3 * CFG.n_layers] == [r for r in executed for _ in range(3)]
    assert out.work.token_layers == out.work.expert_calls == sum(executed)
    assert out.work.positions == batch * length * CFG.n_layers
    assert out.aux == {}  # the loss terms are training terms


@given(length=st.integers(1, 16), capacity=capacities, seed=seeds)
def test_a_prefix_is_computed_as_it_is_inside_the_longer_sequence(length, capacity, seed):
    model = sparse_model(seed, capacity=capacity)
    idx = random_tokens(seed, 2, CFG.n_seq)
    with torch.no_grad():
        whole, prefix = model(idx), model(idx[:, :length])
    torch.testing.assert_close(prefix.logits, whole.logits[:, :length], rtol=1e-10, atol=1e-10)
    assert torch.equal(prefix.stats["layers_per_token"],
                       whole.stats["layers_per_token"][:, :length])


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_a_block_where_no_position_computes_is_finite_and_carries_nothing(batch, length, seed):
    model = sparse_model(seed).train()
    with torch.no_grad():
        model.importance[0].bias.fill_(-50.0)
    x = block_input(seed, batch, length)
    out, terms, subset = run(model, 0, x)
    assert subset.size == 0 and float(terms["balance"]) == 0
    assert bool(torch.isfinite(out).all())
    block = model.blocks[0]
    free = block.mix(block.resolvent(torch.zeros(batch, length, CFG.bk_channels, dtype=F64)))
    torch.testing.assert_close(out, x + free, rtol=0, atol=0)


@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=seeds)
def test_carry_is_the_value_at_the_last_computed_position_before(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, length, 2, dtype=F64, generator=g)
    computed = random_mask(seed, batch, length) == 1
    carried = carry_previous(values, computed)
    for i in range(batch):
        for t in range(length):
            before = [s for s in range(t) if computed[i, s]]
            expected = values[i, before[-1]] if before else torch.zeros(2, dtype=F64)
            assert torch.equal(carried[i, t], expected)


@given(length=st.integers(2, 16), capacity=capacities, data=st.data(), seed=seeds)
def test_no_position_sees_a_later_token(length, capacity, data, seed):
    model = sparse_model(seed, capacity=capacity)
    cut = data.draw(st.integers(0, length - 2), label="last unperturbed position")
    idx = random_tokens(seed, 2, length)
    changed = idx.clone()
    changed[:, cut + 1:] = (idx[:, cut + 1:] + 1) % CFG.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after.logits[:, :cut + 1], before.logits[:, :cut + 1],
                               rtol=1e-10, atol=1e-10)
    assert torch.equal(after.stats["sparsity"][:, :cut + 1], before.stats["sparsity"][:, :cut + 1])
    assert not torch.allclose(after.logits[:, cut + 1], before.logits[:, cut + 1])


@given(batch=st.integers(1, 3), length=st.integers(1, 16), capacity=capacities, seed=seeds)
def test_step_by_step_decoding_equals_the_forward_pass(batch, length, capacity, seed):
    model = sparse_model(seed, capacity=capacity)
    idx = random_tokens(seed, batch, length)
    with torch.no_grad():
        expected = model(idx).logits
        logits, states = decode(model, idx)
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
        middle = length // 2  # a state is never modified: stepping from it again is the same
        again, _ = model.step(idx[:, middle], states[middle])
    torch.testing.assert_close(again, logits[:, middle], rtol=0, atol=0)


def test_decoding_needs_its_own_state():
    model = SparseLanguageModel(CFG)
    assert isinstance(model.init_state(2), SparseDecodeState)
    with pytest.raises(TypeError, match="SparseDecodeState"):
        model.step(torch.zeros(2, dtype=torch.int64), DecodeState(g=(None,) * CFG.n_layers))


@given(length=st.integers(1, 12), seed=seeds)
def test_evaluation_is_deterministic(length, seed):
    model = sparse_model(seed)
    idx = random_tokens(seed, 2, length)
    first, second = model(idx), model(idx)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.stats["sparsity"], second.stats["sparsity"])


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_a_model_that_computes_everywhere_is_the_dense_model(capacity):
    dense = float64_model(0)
    model = SparseLanguageModel(CFG, capacity=capacity).double().eval()
    model.load_state_dict(dense.state_dict(), strict=False)  # predictors: logit 3, compute
    idx = random_tokens(0, 3, 16)
    got, expected = model(idx), dense(idx)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-12, atol=1e-12)
    assert got.work == expected.work
    assert float(got.stats["sparsity"].max()) == 0


def test_dense_weights_load_under_the_same_names():
    result = SparseLanguageModel(CFG).load_state_dict(LanguageModel(CFG).state_dict(),
                                                      strict=False)
    assert result.unexpected_keys == []
    assert all(key.startswith("importance.") for key in result.missing_keys)


def test_the_training_mask_is_hard_with_a_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.zeros(20000, dtype=F64, requires_grad=True)
    mask = compute_mask(logits, training=True)
    assert bool(((mask == 0) | (mask == 1)).all())
    assert abs(float(mask.detach().mean()) - 0.5) < 0.02  # P(compute) = sigmoid(logit) = 0.5
    mask.sum().backward()
    assert bool((logits.grad > 0).all()) and bool((logits.grad <= 0.25).all())  # sigmoid'
    evaluation = compute_mask(torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 2.0]), training=False)
    assert evaluation.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_the_task_loss_gradient_reaches_every_predictor(capacity):
    model = float64_model(0, SparseLanguageModel, replace(CFG, balance_weight=0.0),
                          sparsity_weight=0.0, capacity=capacity).train()
    with torch.no_grad():
        for predictor in model.importance:
            predictor.bias.zero_()  # about half the positions compute
    idx = random_tokens(0, 4, 16)
    model(idx, idx).loss.backward()
    for predictor in model.importance:
        assert float(predictor.weight.grad.abs().sum()) > 0


def test_the_sparsity_loss_pulls_the_skip_rate_towards_the_target():
    model = float64_model(0, SparseLanguageModel, target_sparsity=0.75).train()  # skips ~5%
    idx = random_tokens(0, 4, 16)
    out = model(idx, idx)
    assert set(out.aux) == {"balance", "sparsity"}
    out.aux["sparsity"].backward()
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


def test_the_knobs_are_the_keyword_only_constructor_arguments():
    parameters = inspect.signature(SparseLanguageModel).parameters
    declared = {k.name: k.default for k in SparseLanguageModel.KNOBS}
    assert declared == {"target_sparsity": 0.5, "sparsity_weight": 1.0, "capacity": None}
    assert {name: p.default for name, p in parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY} == declared
    model = SparseLanguageModel.from_knobs(CFG, {"capacity": "0.5", "target_sparsity": 0.25})
    assert model.knob_values() == {"target_sparsity": 0.25, "sparsity_weight": 1.0,
                                   "capacity": 0.5}


@pytest.mark.parametrize(("knob", "value"), [
    ("target_sparsity", 1.0), ("target_sparsity", -0.1), ("target_sparsity", float("nan")),
    ("target_sparsity", "high"), ("sparsity_weight", -1.0), ("sparsity_weight", float("nan")),
    ("sparsity_weight", float("inf")), ("capacity", 0.0), ("capacity", 1.5),
    ("capacity", float("nan")), ("capacity", True)])
def test_bad_knob_values_raise_errors_naming_the_knob(knob, value):
    with pytest.raises(KnobError, match=f"knob {knob}"):
        SparseLanguageModel(CFG, **{knob: value})
    with pytest.raises(KnobError, match=f"knob {knob}"):
        SparseLanguageModel.from_knobs(CFG, {knob: value})


@given(n=st.integers(1, 64), keep=st.floats(0.01, 1.0))
def test_strided_positions_keep_the_rate_in_every_prefix(n, keep):
    taken = strided(n, keep)
    assert bool(taken[0]) and int(taken.sum()) == slots(keep, n)
    counts = taken.cumsum(0)
    for m in range(1, n + 1):  # the first m positions hold ceil(m * keep) of them
        assert m * keep - 1e-9 <= int(counts[m - 1]) < m * keep + 1
    assert torch.equal(strided(n + 5, keep)[:n], taken)  # causal: longer sequences agree


def test_slots_is_ceil_without_the_float_round_up():
    assert slots(0.55, 100) == 55 and slots(0.551, 100) == 56 and slots(1.0, 7) == 7
    assert slots(0.01, 16) == 1


class Pattern(nn.Module):
    """A stand-in predictor deciding by position: +10 where ``pattern`` ``(N,)`` is true."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.pattern = pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.pattern[:x.shape[1]], 10.0, -10.0).to(x.dtype).expand(
            *x.shape[:2])[..., None]


def failing_hooks(model: SparseLanguageModel) -> list:
    def fail(module, args):
        raise AssertionError("a forced model must not run its predictors")
    return [p.register_forward_pre_hook(fail) for p in model.importance]


@given(batch=st.integers(1, 3), length=st.integers(1, 16), keep=st.sampled_from([0.25, 0.5, 1.0]),
       capacity=capacities, seed=seeds)
def test_forced_uniform_runs_evenly_strided_positions_without_predictors(
        batch, length, keep, capacity, seed):
    model = sparse_model(seed, capacity=capacity)
    forced = model.forced(Forcing(keep, "uniform"))
    assert model.forcing is None and forced.forcing == Forcing(keep, "uniform")
    idx = random_tokens(seed, batch, length)
    hooks = failing_hooks(model)
    try:
        with torch.no_grad():
            out = forced(idx)
    finally:
        for h in hooks:
            h.remove()
    pattern = strided(length, keep).expand(batch, length)
    assert torch.equal(out.stats["layers_per_token"], CFG.n_layers * pattern.double())
    assert out.work.token_layers == CFG.n_layers * batch * slots(keep, length)
    with torch.no_grad():
        logits, _, _ = reference_model(model, idx, [pattern] * CFG.n_layers)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)


@given(batch=st.integers(1, 3), length=st.integers(1, 16), keep=st.sampled_from([0.3, 0.7]),
       seed=seeds)
def test_forced_per_token_draws_every_position_and_layer_independently(batch, length, keep,
                                                                      seed):
    model = sparse_model(seed)
    forcing = Forcing(keep, "per_token", seed=seed)
    idx = random_tokens(seed, batch, length)
    hooks = failing_hooks(model)
    try:
        with torch.no_grad():
            out = model.forced(forcing)(idx)
    finally:
        for h in hooks:
            h.remove()
    generator = forcing.generator()
    draws = [(torch.rand(batch * length, generator=generator, dtype=F64) < keep).view(
        batch, length) for _ in range(CFG.n_layers)]
    assert torch.equal(out.stats["layers_per_token"], sum(d.double() for d in draws))
    assert out.work.token_layers == sum(int(d.sum()) for d in draws)
    with torch.no_grad():
        logits, _, _ = reference_model(model, idx, draws)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)


def test_the_per_token_rate_is_the_requested_one():
    model = SparseLanguageModel(CFG).eval()
    with torch.no_grad():
        out = model.forced(Forcing(0.3, "per_token"))(random_tokens(0, 16, 16))
    rate = out.work.token_layers / (16 * 16 * CFG.n_layers)
    assert abs(rate - 0.3) < 0.05  # 768 draws: 4 standard deviations


@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_forced_equals_learned_when_the_predictors_make_the_same_decisions(keep):
    model = sparse_model(0)
    model.importance = nn.ModuleList(Pattern(strided(16, keep)) for _ in range(CFG.n_layers))
    idx = random_tokens(0, 3, 16)
    with torch.no_grad():
        learned, forced = model(idx), model.forced(Forcing(keep))(idx)
    torch.testing.assert_close(forced.logits, learned.logits, rtol=1e-12, atol=1e-12)
    assert forced.work == learned.work
    assert torch.equal(forced.stats["layers_per_token"], learned.stats["layers_per_token"])


def test_a_forced_model_does_not_decode():
    forced = SparseLanguageModel(CFG).forced(Forcing(0.5))
    with pytest.raises(NotImplementedError, match="forced"):
        forced.init_state(1)


def test_the_forced_model_shares_the_weights():
    model = SparseLanguageModel(CFG)
    forced = model.forced(Forcing(0.5))
    assert forced.blocks is model.blocks and forced.importance is model.importance
    assert math.isclose(forced.target_sparsity, model.target_sparsity)
