"""Properties of the multi-scale (hourglass) ResNet-BK model."""

import inspect
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.multiscale import (
    HourglassDecodeState,
    MultiScaleLanguageModel,
    block_levels,
    pool,
    unpool,
)
from bk.model import DecodeState, LanguageModel
from bk.technique import Forcing, KnobError
from tests.strategies import TINY_4_LAYERS as CFG
from tests.strategies import decode, float64_model, random_tokens, seeds

MIRROR_CFG = replace(CFG, n_layers=5)  # rise="mirror" with levels=2 needs 2 * 2 + 1 blocks
rises = st.sampled_from(["last", "mirror"])


def models(factor: int, levels: int, seed: int, rise: str = "last", *, perturb: bool = True
           ) -> tuple[LanguageModel, MultiScaleLanguageModel]:
    """A float64 dense model and a multi-scale model with its weights (and, with ``perturb``,
    non-trivial pooling weights and gains); 4 blocks with ``rise="last"``, 5 with ``"mirror"``."""
    config = CFG if rise == "last" else MIRROR_CFG
    dense = float64_model(seed, config=config)
    multi = MultiScaleLanguageModel(config, factor=factor, levels=levels,
                                    rise=rise).double().eval()
    multi.load_state_dict(dense.state_dict(), strict=False)
    if perturb:
        with torch.no_grad():
            for p in [*multi.pool_weights, *multi.unpool_gains]:
                p.add_(torch.randn_like(p))
    return dense, multi


@given(batch=st.integers(1, 3), length=st.integers(0, 13), k=st.integers(1, 4), seed=seeds)
def test_pooled_group_is_the_softmax_weighted_sum_of_its_own_positions(batch, length, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 3, dtype=torch.float64, generator=g)
    w = torch.randn(k, 3, dtype=torch.float64, generator=g)
    out = pool(x, w)
    assert out.shape == (batch, length // k, 3)
    for j in range(length // k):
        for c in range(3):
            e = [torch.exp(w[r, c]).item() for r in range(k)]
            expected = sum(e[r] * x[:, j * k + r, c] for r in range(k)) / sum(e)
            torch.testing.assert_close(out[:, j, c], expected, rtol=1e-12, atol=1e-12)


@given(length=st.integers(0, 13), k=st.integers(1, 4), seed=seeds)
def test_equal_pooling_weights_give_mean_pooling(length, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 3, dtype=torch.float64, generator=g)
    equal = torch.full((k, 3), float(torch.randn((), generator=g)), dtype=torch.float64)
    groups = length // k
    mean = x[:, :groups * k].reshape(2, groups, k, 3).mean(dim=2)
    torch.testing.assert_close(pool(x, equal), mean, rtol=1e-12, atol=1e-12)


@given(batch=st.integers(1, 3), length=st.integers(0, 13), k=st.integers(1, 4), seed=seeds)
def test_unpooled_position_reads_only_the_last_completed_group(batch, length, k, seed):
    g = torch.Generator().manual_seed(seed)
    groups = length // k
    delta = torch.randn(batch, groups, 3, dtype=torch.float64, generator=g)
    gains = torch.randn(k, 3, dtype=torch.float64, generator=g)
    out = unpool(delta, gains, length)
    assert out.shape == (batch, length, 3)
    for t in range(length):
        j = (t + 1) // k - 1  # the newest group whose last position jk+k-1 is <= t
        expected = torch.zeros(batch, 3, dtype=torch.float64) if j < 0 else \
            gains[(t - (k - 1)) % k] * delta[:, j]
        assert j * k + k - 1 <= t
        torch.testing.assert_close(out[:, t], expected, rtol=0, atol=0)


def test_unpool_rejects_a_length_its_groups_do_not_tile():
    with pytest.raises(ValueError, match="do not tile"):
        unpool(torch.zeros(1, 3, 2), torch.ones(2, 2), 9)


@given(batch=st.integers(1, 2), length=st.integers(1, 24), factor=st.integers(1, 3),
       levels=st.integers(0, 2), rise=rises, seed=seeds)
def test_logits_have_the_input_shape_for_every_length(batch, length, factor, levels, rise, seed):
    _, multi = models(factor, levels, seed, rise)
    out = multi(random_tokens(seed, batch, length))
    assert out.logits.shape == (batch, length, CFG.vocab_size)
    assert bool(torch.isfinite(out.logits).all())


@given(length=st.integers(2, 24), factor=st.integers(1, 4), levels=st.integers(1, 2),
       rise=rises, data=st.data(), seed=seeds)
def test_no_position_sees_a_later_token(length, factor, levels, rise, data, seed):
    _, multi = models(factor, levels, seed, rise)
    cut = data.draw(st.integers(0, length - 2), label="last unperturbed position")
    idx = random_tokens(seed, 2, length)
    changed = idx.clone()
    changed[:, cut + 1:] = (idx[:, cut + 1:] + 1 + random_tokens(seed + 1, 2, length - cut - 1)
                            % (CFG.vocab_size - 1)) % CFG.vocab_size
    with torch.no_grad():
        before, after = multi(idx).logits, multi(changed).logits
    torch.testing.assert_close(after[:, :cut + 1], before[:, :cut + 1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(after[:, cut + 1], before[:, cut + 1])


def test_the_coarse_update_reaches_the_full_resolution_stream():
    _, multi = models(2, 2, 0)
    idx = random_tokens(0, 2, 16)
    with torch.no_grad():
        with_coarse = multi(idx).logits
        for gain in multi.unpool_gains:
            gain.zero_()
        without = multi(idx).logits
    # Positions before the first completed group (t < k-1) receive nothing either way.
    torch.testing.assert_close(without[:, 0], with_coarse[:, 0], rtol=0, atol=0)
    assert not torch.allclose(without[:, 1:], with_coarse[:, 1:])


@given(length=st.integers(1, 24), levels=st.integers(1, 2), rise=rises, seed=seeds)
def test_factor_one_reproduces_the_dense_model(length, levels, rise, seed):
    dense, multi = models(1, levels, seed, rise, perturb=False)
    with torch.no_grad():
        for w in multi.pool_weights:
            w.add_(torch.randn_like(w))  # a single-position softmax is 1 whatever its logit
    idx = random_tokens(seed, 2, length)
    expected, got = dense(idx, idx), multi(idx, idx)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-12, atol=1e-12)
    assert got.work == expected.work


@given(length=st.integers(1, 24), factor=st.integers(1, 4), seed=seeds)
def test_zero_levels_reproduce_the_dense_model_exactly(length, factor, seed):
    dense, multi = models(factor, 0, seed)
    idx = random_tokens(seed, 2, length)
    assert torch.equal(multi(idx).logits, dense(idx).logits)


@given(length=st.integers(1, 40), factor=st.integers(2, 4), levels=st.integers(1, 2),
       rise=rises)
def test_blocks_run_on_the_reduced_lengths_and_the_work_counts_them(length, factor, levels,
                                                                     rise):
    _, multi = models(factor, levels, 0, rise)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for b in multi.blocks]
    try:
        out = multi(random_tokens(0, 3, length))
    finally:
        for h in hooks:
            h.remove()
    lengths = [length // factor ** level for level in multi.block_level]
    assert seen == [n for n in lengths if n > 0]
    assert out.work.token_layers == out.work.expert_calls == out.work.positions == 3 * sum(lengths)
    torch.testing.assert_close(out.stats["layers_per_token"],
                               torch.full((3, length), sum(lengths) / length,
                                          dtype=torch.float64))


def test_default_hierarchy_is_full_half_quarter_full():
    assert block_levels(4, 2) == (0, 1, 2, 0)
    assert block_levels(4, 1) == (0, 1, 1, 0)
    assert block_levels(6, 2) == (0, 1, 2, 2, 2, 0)
    assert block_levels(1, 0) == (0,)


def test_a_mirrored_hourglass_comes_back_up_one_level_per_block():
    assert block_levels(8, 2, "mirror") == (0, 1, 2, 2, 2, 2, 1, 0)
    assert block_levels(5, 2, "mirror") == (0, 1, 2, 1, 0)
    assert block_levels(8, 1, "mirror") == block_levels(8, 1) == (0, 1, 1, 1, 1, 1, 1, 0)
    assert block_levels(3, 0, "mirror") == (0, 0, 0)


def test_dense_weights_load_under_the_same_names():
    dense = LanguageModel(CFG)
    multi = MultiScaleLanguageModel(CFG, factor=2, levels=2)
    result = multi.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["pool_weights.0", "pool_weights.1",
                                           "unpool_gains.0", "unpool_gains.1"]


def test_gradient_reaches_the_pooling_weights_and_the_gains():
    _, multi = models(2, 2, 0)
    multi.train()
    idx = random_tokens(0, 2, 16)
    multi(idx, idx).loss.backward()
    for p in [*multi.pool_weights, *multi.unpool_gains]:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize(("knobs", "message"), [
    ({"factor": 0}, "knob factor"), ({"factor": 2.5}, "knob factor"),
    ({"factor": "two"}, "knob factor"), ({"factor": float("nan")}, "knob factor"),
    ({"factor": True}, "knob factor"), ({"levels": -1}, "knob levels"),
    ({"levels": 1.5}, "knob levels"), ({"levels": 3}, "knob levels: levels=3 needs at least"),
    ({"rise": "up"}, "knob rise"),
    ({"levels": 2, "rise": "mirror"}, "knob rise: 'mirror' with levels=2 needs at least"),
])
def test_bad_factor_or_levels_raise_errors_naming_the_knob(knobs, message):
    with pytest.raises(KnobError, match=message):
        MultiScaleLanguageModel(CFG, **knobs)
    with pytest.raises(KnobError, match=message):
        MultiScaleLanguageModel.from_knobs(CFG, knobs)


def test_the_knobs_are_the_keyword_only_constructor_arguments():
    parameters = inspect.signature(MultiScaleLanguageModel).parameters
    declared = {k.name: k.default for k in MultiScaleLanguageModel.KNOBS}
    assert declared == {"factor": 2, "levels": 2, "rise": "last"}
    assert {name: p.default for name, p in parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY} == declared
    model = MultiScaleLanguageModel.from_knobs(CFG, {"factor": "4", "levels": 1.0})
    assert model.knob_values() == {"factor": 4, "levels": 1, "rise": "last"}
    assert isinstance(model.levels, int) and model.block_level == (0, 1, 1, 0)


def test_it_makes_no_decisions_to_force():
    assert MultiScaleLanguageModel(CFG).forced(Forcing(0.5)) is None


def test_only_training_adds_the_balance_term():
    _, multi = models(2, 2, 0)
    idx = random_tokens(0, 2, 16)
    assert multi(idx, idx).aux == {}
    assert set(multi.train()(idx, idx).aux) == {"balance"}


@given(batch=st.integers(1, 3), length=st.integers(1, 24), factor=st.integers(1, 4),
       levels=st.integers(0, 2), rise=rises, seed=seeds)
def test_step_by_step_decoding_equals_the_forward_pass(batch, length, factor, levels, rise,
                                                       seed):
    _, multi = models(factor, levels, seed, rise)
    idx = random_tokens(seed, batch, length)
    with torch.no_grad():
        expected = multi(idx).logits
        logits, states = decode(multi, idx)
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
        middle = length // 2  # a state is never modified: stepping from it again is the same
        again, _ = multi.step(idx[:, middle], states[middle])
    torch.testing.assert_close(again, logits[:, middle], rtol=0, atol=0)


def test_decoding_needs_its_own_state():
    multi = MultiScaleLanguageModel(CFG)
    assert isinstance(multi.init_state(2), HourglassDecodeState)
    with pytest.raises(TypeError, match="HourglassDecodeState"):
        multi.step(torch.zeros(2, dtype=torch.int64), DecodeState(g=(None,) * CFG.n_layers))
