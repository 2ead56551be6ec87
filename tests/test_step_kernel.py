"""Properties of bk.step_kernel.StepKernel: the same function as LanguageModel.step."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.early_exit import EarlyExitLanguageModel
from bk.decode import decode
from bk.maxent_ts import LogLikelihoodReward, SearchConfig, maxent_ts
from bk.model import LanguageModel, ModelConfig
from bk.step_kernel import StepKernel
from tests.strategies import TINY, model_seeds, small_models, tiny_model


def tokens_for(model: LanguageModel, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.cfg.vocab_size, (batch, length), generator=g)


@given(small_models(), st.integers(1, 4), st.integers(1, 8), st.integers(0, 99))
def test_kernel_logits_and_states_equal_the_torch_step_in_float64(model, batch, length, seed):
    idx = tokens_for(model, batch, length, seed)
    kernel = StepKernel.of(model)
    with torch.no_grad():
        full = model(idx).logits
        ours, theirs = model.init_state(batch), model.init_state(batch)
        for i in range(length):
            logits, ours = kernel(idx[:, i], ours)
            expected, theirs = model.step(idx[:, i], theirs)
            torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(logits, full[:, i], rtol=1e-10, atol=1e-10)
            for g, h in zip(ours.g, theirs.g, strict=True):
                torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)
            assert ours.position == theirs.position == i + 1


@given(model_seeds, st.integers(1, 4), st.integers(0, 99))
def test_kernel_agrees_with_the_torch_step_in_float32(seed, batch, seed_tokens):
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(vocab_size=30)).eval()
    idx = tokens_for(model, batch, 12, seed_tokens)
    kernel = StepKernel.of(model)
    with torch.no_grad():
        ours, theirs = model.init_state(batch), model.init_state(batch)
        for i in range(idx.shape[1]):
            logits, ours = kernel(idx[:, i], ours)
            expected, theirs = model.step(idx[:, i], theirs)
            assert logits.dtype == torch.float32 and ours.g[0].dtype == torch.complex64
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@given(model_seeds, st.integers(1, 5), st.integers(0, 99))
def test_states_pass_between_the_kernel_and_the_torch_step(seed, switch, seed_tokens):
    model = tiny_model(seed)
    idx = tokens_for(model, 2, 6, seed_tokens)
    kernel = StepKernel.of(model)
    with torch.no_grad():
        mixed, reference = model.init_state(2), model.init_state(2)
        for i in range(idx.shape[1]):
            step = model.step if (i < switch) == (seed % 2 == 0) else kernel
            logits, mixed = step(idx[:, i], mixed)
            expected, reference = model.step(idx[:, i], reference)
            torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


@given(model_seeds, st.integers(0, 99))
def test_a_kernel_step_never_changes_the_state_it_starts_from(seed, seed_tokens):
    model = tiny_model(seed)
    idx = tokens_for(model, 3, 4, seed_tokens)
    kernel = StepKernel.of(model)
    state = model.init_state(3)
    for i in range(3):
        _, state = kernel(idx[:, i], state)
    before = [g.clone() for g in state.g]
    first, _ = kernel(idx[:, 3], state)
    kernel((idx[:, 3] + 1) % TINY.vocab_size, state)
    again, _ = kernel(idx[:, 3], state)
    assert all(torch.equal(g, h) for g, h in zip(state.g, before, strict=True))
    assert torch.equal(first, again)


@given(model_seeds, st.integers(0, 99), st.integers(1, 10))
def test_generation_with_and_without_the_kernel_is_the_same(seed, seed_tokens, n):
    model = tiny_model(seed)
    prompt = tokens_for(model, 2, 3, seed_tokens)
    for temperature in (0, 1.0):
        runs = [decode(model, prompt, n, temperature=temperature, kernel=kernel,
                       generator=torch.Generator().manual_seed(seed_tokens)).tokens
                for kernel in (True, False)]
        assert torch.equal(*runs)


@given(model_seeds, st.integers(0, 99))
def test_tree_search_with_and_without_the_kernel_finds_the_same_sequences(seed, seed_tokens):
    model = tiny_model(seed)
    prompt = tokens_for(model, 1, 3, seed_tokens)[0]
    reward = LogLikelihoodReward(tiny_model(seed + 1), prompt_length=3)
    runs = [maxent_ts(model, prompt, reward, SearchConfig(rollouts=4, max_new_tokens=5, top_k=3,
                                                          seed=seed_tokens, kernel=kernel))
            for kernel in (True, False)]
    assert [r.tokens.tolist() for r in runs[0].rollouts] == [
        r.tokens.tolist() for r in runs[1].rollouts]


def test_the_kernel_uses_the_weights_as_they_were_when_it_was_built():
    model = LanguageModel(TINY).double().eval()
    tokens = torch.tensor([1, 2])
    kernel = StepKernel.of(model)
    before, _ = kernel(tokens, model.init_state(2))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    after, _ = kernel(tokens, model.init_state(2))
    assert torch.equal(before, after)
    rebuilt, _ = StepKernel.of(model)(tokens, model.init_state(2))
    torch.testing.assert_close(rebuilt, before + 1.0, rtol=1e-12, atol=1e-12)


def test_bad_tokens_and_states_are_refused_with_what_was_expected():
    model = tiny_model(0)
    kernel = StepKernel.of(model)
    state = model.init_state(2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 17\), got 17"):
        kernel(torch.tensor([3, TINY.vocab_size]), state)
    with pytest.raises(ValueError, match="got -1"):
        kernel(torch.tensor([-1, 0]), state)
    with pytest.raises(ValueError, match="1-D int64"):
        kernel(torch.tensor([[1, 2]]), state)
    with pytest.raises(ValueError, match="1-D int64"):
        kernel(torch.tensor([1.0, 2.0]), state)
    _, state = kernel(torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        kernel(torch.tensor([1, 2, 3]), state)
    with pytest.raises(ValueError, match=r"expected \(2, 2\) torch.complex128"):
        kernel(torch.tensor([1, 2]), type(state)(tuple(g.to(torch.complex64) for g in state.g)))
    with pytest.raises(ValueError, match=r"holds nothing in a layer"):
        kernel(torch.tensor([1, 2]), type(state)((state.g[0], None, state.g[2])))
    with pytest.raises(ValueError, match="the state has 2 layers, the model 3"):
        kernel(torch.tensor([1, 2]), type(state)(state.g[:2], state.position))


def test_only_a_plain_language_model_gets_a_kernel():
    assert StepKernel.supports(tiny_model(0))
    model = EarlyExitLanguageModel(TINY)
    assert not StepKernel.supports(model)
    with pytest.raises(TypeError, match="EarlyExitLanguageModel"):
        StepKernel.of(model)
    with pytest.raises(TypeError, match=r"float32 or all in float64, got \[.torch.bfloat16.\]"):
        StepKernel.of(LanguageModel(TINY).to(torch.bfloat16))
    mixed = LanguageModel(TINY)
    mixed.head.double()
    with pytest.raises(TypeError, match=r"\['torch.float32', 'torch.float64'\]"):
        StepKernel.of(mixed)
