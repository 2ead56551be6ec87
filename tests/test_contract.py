"""Every registered technique keeps the contract of bk/technique.py."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench.registry import REFERENCE, techniques
from bk.model import LanguageModel
from bk.technique import Forcing, KnobError, TechniqueModel
from tests.strategies import TINY_4_LAYERS as CFG
from tests.strategies import decode, random_tokens, seeds

NAMES = [name for name in techniques() if name != REFERENCE]
F64 = torch.float64


def perturbed(name: str, seed: int = 0) -> TechniqueModel:
    """The technique in float64 with every parameter moved off its initial value (so that no
    term is zero by construction), in eval mode."""
    torch.manual_seed(seed)
    model = techniques()[name].make(CFG).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_a_technique_is_a_technique_model_that_declares_and_keeps_its_knobs(name):
    technique = techniques()[name]
    model = technique.make(CFG)
    assert isinstance(model, TechniqueModel)
    assert technique.knobs == type(model).KNOBS
    assert model.knob_values() == technique.resolve()
    dense = LanguageModel(CFG)
    loaded = model.load_state_dict(dense.state_dict(), strict=False)
    assert not loaded.unexpected_keys


@pytest.mark.parametrize("name", NAMES)
def test_an_integer_knob_rejects_a_fraction_and_every_knob_names_itself(name):
    technique = techniques()[name]
    for knob in technique.knobs:
        bad = 2.5 if knob.kind is int else "nonsense" if knob.kind is not str else 3.5
        if knob.kind is str and not knob.choices:
            continue
        with pytest.raises(KnobError, match=f"knob {knob.name}"):
            technique.resolve({knob.name: bad})
    with pytest.raises(KnobError, match="no knob"):
        technique.resolve({"no_such_knob": 1})


@pytest.mark.parametrize("name", NAMES)
def test_the_loss_is_the_cross_entropy_plus_the_named_auxiliary_terms(name):
    model = perturbed(name)
    x = random_tokens(1, 2, CFG.n_seq)
    for training in (True, False):
        model.train(training)
        torch.manual_seed(0)
        out = model(x, x)
        expected = out.ce + sum(out.aux.values(), torch.zeros((), dtype=F64))
        torch.testing.assert_close(out.loss, expected)
        assert out.logits.shape == (2, CFG.n_seq, CFG.vocab_size)
        assert out.stats["layers_per_token"].shape == (2, CFG.n_seq)
        assert out.work.flops(CFG) > 0


@pytest.mark.parametrize("name", NAMES)
@given(seed=seeds, i=st.integers(0, CFG.n_seq - 2))
def test_logits_at_a_position_never_depend_on_later_tokens(name, seed, i):
    model = perturbed(name)
    x = random_tokens(seed, 2, CFG.n_seq)
    changed = x.clone()
    changed[:, i + 1:] = random_tokens(seed + 1, 2, CFG.n_seq - i - 1)
    with torch.no_grad():
        a, b = model(x).logits[:, :i + 1], model(changed).logits[:, :i + 1]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@given(seed=seeds, b=st.integers(1, 3), n=st.integers(1, 10))
def test_decoding_equals_the_forward_pass_or_says_why_it_cannot(name, seed, b, n):
    model = perturbed(name, seed % 7)
    x = random_tokens(seed, b, n)
    if not model.DECODES:
        with pytest.raises(NotImplementedError, match=model.NO_DECODE_REASON[:20]):
            model.init_state(b)
        return
    with torch.no_grad():
        full = model(x).logits
    torch.testing.assert_close(decode(model, x)[0], full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pattern", ["uniform", "per_token"])
def test_a_forced_model_shares_the_weights_leaves_the_model_alone_and_skips_more_at_lower_keep(
        name, pattern):
    """Left alone means: after the forced models ran, the model gives what a twin with the same
    history gives (a model whose outputs depend on its earlier calls, the routing cache's hits,
    need not repeat its first output)."""
    model = perturbed(name)
    twin = copy.deepcopy(model)
    x = random_tokens(3, 4, CFG.n_seq)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, rtol=0, atol=0)
        full, half = model.forced(Forcing(1.0, pattern)), model.forced(Forcing(0.5, pattern))
        if full is None:
            assert half is None
            return
        assert full is not model and half is not model
        assert all(p is q for p, q in zip(half.parameters(), model.parameters(), strict=False))
        work_full, work_half = full(x).work.flops(CFG), half(x).work.flops(CFG)
        torch.testing.assert_close(model(x).logits, twin(x).logits, rtol=0, atol=0)
    assert work_half < work_full


@pytest.mark.parametrize("name", NAMES)
def test_the_schedule_accepts_progress_in_the_unit_interval_only(name):
    model = techniques()[name].make(CFG)
    for progress in (0.0, 0.5, 1.0):
        model.schedule(progress)
    with pytest.raises(ValueError, match="progress"):
        model.schedule(1.5)
