"""The combined model: the hourglass with per-position sparsity, composed exactly."""

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.combined import CombinedLanguageModel
from bk.adaptive.multiscale import MultiScaleLanguageModel
from bk.adaptive.sparsity import slots
from bk.model import LanguageModel
from bk.technique import Forcing, KnobError
from tests.strategies import TINY_4_LAYERS as CONFIG
from tests.strategies import float64_model, random_tokens, seeds


def models(**knobs):
    combined = float64_model(0, CombinedLanguageModel, CONFIG, **knobs)
    multiscale = MultiScaleLanguageModel(CONFIG, factor=combined.factor,
                                         levels=combined.levels).double().eval()
    multiscale.load_state_dict(combined.state_dict(), strict=False)
    return combined, multiscale


def randomise_predictors(combined: CombinedLanguageModel, seed: int) -> None:
    """Predictor logits straddling zero, so that some positions skip."""
    with torch.no_grad():
        for predictor in combined.importance:
            predictor.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
            predictor.bias.zero_()


def level_lengths(combined: CombinedLanguageModel, n: int) -> list[int]:
    return [n // combined.factor ** level for level in combined.block_level]


def test_with_every_position_computing_it_equals_the_multiscale_model():
    combined, multiscale = models()
    x = random_tokens(0, 3, 16)
    with torch.no_grad():
        a, b = combined(x), multiscale(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    assert a.work == b.work


def test_with_factor_one_and_every_position_computing_it_equals_the_dense_model():
    combined, _ = models(factor=1)
    dense = LanguageModel(CONFIG).double().eval()
    dense.load_state_dict(combined.state_dict(), strict=False)
    x = random_tokens(0, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(combined(x).logits, dense(x).logits, rtol=1e-12, atol=1e-12)


@given(n=st.integers(2, 16), cut=st.integers(1, 15), capacity=st.sampled_from([None, 0.25]),
       seed=seeds)
def test_a_position_never_sees_a_later_token(n, cut, capacity, seed):
    cut = min(cut, n - 1)
    combined, _ = models(capacity=capacity)
    randomise_predictors(combined, seed)
    x = random_tokens(seed, 2, n)
    y = x.clone()
    y[:, cut:] = (y[:, cut:] + 1) % CONFIG.vocab_size
    with torch.no_grad():
        a, b = combined(x).logits, combined(y).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-12)


def test_skipped_positions_are_not_counted_as_work_and_outputs_stay_finite():
    combined, multiscale = models()
    with torch.no_grad():
        for predictor in combined.importance:
            predictor.bias.fill_(-5.0)  # every position skips
        out = combined(random_tokens(0, 3, 16))
    assert out.work.token_layers == 0 < multiscale(random_tokens(0, 3, 16)).work.token_layers
    assert torch.isfinite(out.logits).all()


def test_training_gradient_reaches_every_importance_predictor():
    combined, _ = models(target_sparsity=0.5)
    combined.train()
    combined.schedule(1.0)
    x = random_tokens(0, 3, 16)
    out = combined(x, x)
    assert set(out.aux) == {"balance", "sparsity"}
    out.loss.backward()
    for predictor in combined.importance:
        assert predictor.weight.grad is not None and predictor.weight.grad.abs().sum() > 0
    assert combined.eval()(x, x).aux == {}


@pytest.mark.parametrize("capacity", [0.25, 0.5, 1.0])
def test_a_capacity_runs_a_static_number_of_positions_in_every_block(capacity):
    combined, _ = models(capacity=capacity)
    randomise_predictors(combined, 0)
    rows = []
    hooks = [block.potential.register_forward_pre_hook(
        lambda m, args: rows.append(args[0].shape[0])) for block in combined.blocks]
    try:
        with torch.no_grad():
            out = combined(random_tokens(0, 3, 13))
    finally:
        for h in hooks:
            h.remove()
    contexts = level_lengths(combined, CONFIG.n_seq)  # the cap is a fraction of n_seq's levels
    expected = [3 * min(slots(capacity, c), n) for c, n in
                zip(contexts, level_lengths(combined, 13), strict=True)]
    assert rows == expected and out.work.token_layers == sum(expected)


@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_forced_keeps_the_pooling_and_runs_strided_positions_without_predictors(keep):
    combined, multiscale = models()
    randomise_predictors(combined, 0)
    forced = combined.forced(Forcing(keep))
    assert combined.forcing is None

    def fail(module, args):
        raise AssertionError("a forced model must not run its predictors")
    hooks = [p.register_forward_pre_hook(fail) for p in combined.importance]
    try:
        with torch.no_grad():
            out = forced(random_tokens(0, 3, 16))
    finally:
        for h in hooks:
            h.remove()
    assert out.work.token_layers == sum(3 * slots(keep, n) for n in level_lengths(combined, 16))
    if keep == 1:  # every position runs: the hourglass itself
        torch.testing.assert_close(out.logits, multiscale(random_tokens(0, 3, 16)).logits,
                                   rtol=1e-12, atol=1e-12)


def test_forced_per_token_draws_every_block_independently_at_the_requested_rate():
    combined, multiscale = models()
    idx = random_tokens(0, 16, 16)
    forcing = Forcing(0.3, "per_token", seed=7)
    with torch.no_grad():
        out = combined.forced(forcing)(idx)
    generator = forcing.generator()  # one stream, block after block
    draws = [torch.rand(16 * n, generator=generator, dtype=torch.float64) < 0.3
             for n in level_lengths(combined, 16)]
    assert out.work.token_layers == sum(int(d.sum()) for d in draws)
    rate = out.work.token_layers / multiscale(idx).work.token_layers
    assert abs(rate - 0.3) < 0.06  # 704 draws: 4 standard deviations


def test_the_knobs_are_the_keyword_only_constructor_arguments():
    parameters = inspect.signature(CombinedLanguageModel).parameters
    declared = {k.name: k.default for k in CombinedLanguageModel.KNOBS}
    assert declared == {"factor": 2, "levels": 2, "target_sparsity": 0.1,
                        "sparsity_weight": 1.0, "capacity": None}
    assert {name: p.default for name, p in parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY} == declared
    assert CombinedLanguageModel.knob("target_sparsity").grid == (0.0, 0.1, 0.25)
    model = CombinedLanguageModel.from_knobs(CONFIG, {"factor": "4", "capacity": 0.5})
    assert model.knob_values() == {**declared, "factor": 4, "capacity": 0.5}


@pytest.mark.parametrize(("knob", "value"), [
    ("factor", 2.5), ("levels", 3), ("target_sparsity", float("nan")),
    ("sparsity_weight", -1.0), ("capacity", 0.0)])
def test_bad_knob_values_raise_errors_naming_the_knob(knob, value):
    with pytest.raises(KnobError, match=f"knob {knob}"):
        CombinedLanguageModel(CONFIG, **{knob: value})


def test_incremental_decoding_is_refused_with_its_reason():
    combined, _ = models()
    with pytest.raises(NotImplementedError, match="carried potential"):
        combined.init_state(1)
    with pytest.raises(NotImplementedError, match="use forward"):
        combined.step(random_tokens(0, 1, 1)[:, 0], None)
