"""The combined model: the hourglass with per-position sparsity, composed exactly."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.combined import CombinedLanguageModel
from bk.adaptive.multiscale import MultiScaleLanguageModel
from bk.model import LanguageModel, ModelConfig

CONFIG = ModelConfig(vocab_size=17, d_model=16, n_layers=4, n_seq=16, n_experts=2, d_expert=16,
                     bk_channels=2)


def models(**knobs):
    torch.manual_seed(0)
    combined = CombinedLanguageModel(CONFIG, **knobs).double().eval()
    multiscale = MultiScaleLanguageModel(CONFIG, factor=combined.factor).double().eval()
    multiscale.load_state_dict(combined.state_dict(), strict=False)
    return combined, multiscale


def tokens(b=3, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (b, n), generator=g)


def test_with_every_position_computing_it_equals_the_multiscale_model_exactly():
    combined, multiscale = models()
    x = tokens()
    with torch.no_grad():
        a, b = combined(x), multiscale(x)
    assert torch.equal(a.logits, b.logits)
    assert a.work == b.work


def test_with_factor_one_and_every_position_computing_it_equals_the_dense_model():
    combined, _ = models(factor=1)
    dense = LanguageModel(CONFIG).double().eval()
    dense.load_state_dict(combined.state_dict(), strict=False)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(combined(x).logits, dense(x).logits, rtol=1e-12, atol=1e-12)


@given(n=st.integers(2, 16), cut=st.integers(1, 15), seed=st.integers(0, 1000))
def test_a_position_never_sees_a_later_token(n, cut, seed):
    cut = min(cut, n - 1)
    combined, _ = models()
    with torch.no_grad():  # some positions skip: predictor logits straddle zero
        for predictor in combined.importance:
            predictor.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
            predictor.bias.zero_()
    x = tokens(2, n, seed)
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
        out = combined(tokens())
    assert out.work.token_layers == 0 < multiscale(tokens()).work.token_layers
    assert torch.isfinite(out.logits).all()


def test_training_gradient_reaches_every_importance_predictor():
    combined, _ = models(target_sparsity=0.5)
    combined.train()
    combined.schedule(1.0)
    x = tokens()
    combined(x, x).loss.backward()
    for predictor in combined.importance:
        assert predictor.weight.grad is not None and predictor.weight.grad.abs().sum() > 0
