"""Properties of state-cached generation (bk.decode) against full recomputation, in float64."""

from dataclasses import FrozenInstanceError

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bk.decode import decode, generate, generate_recompute
from bk.model import LanguageModel, Work
from tests.strategies import EOS, TINY, model_seeds, seeds, tiny_model, token_batches


def first_eos(row: torch.Tensor) -> int | None:
    hits = (row == EOS).nonzero()
    return int(hits[0]) if hits.numel() else None


@given(model_seeds, token_batches(max_len=12))
@example(1, torch.arange(TINY.n_seq)[None].repeat(2, 1))  # a prompt as long as n_seq
def test_step_by_step_logits_equal_the_full_forward_logits(seed, prompt):
    model = tiny_model(seed)
    with torch.no_grad():
        full = model(prompt).logits
        state = model.init_state(prompt.shape[0])
        for i in range(prompt.shape[1]):
            logits, state = model.step(prompt[:, i], state)
            torch.testing.assert_close(logits, full[:, i], rtol=1e-12, atol=1e-12)


@given(model_seeds, token_batches(), st.integers(1, 12), st.sampled_from([None, EOS]))
@example(0, torch.full((3, 8), EOS), 12, EOS)  # EOS in the prompt; past n_seq in all
def test_cached_greedy_generation_equals_recompute_greedy_generation(seed, prompt, n, eos):
    model = tiny_model(seed, eos_boost=1.0)
    cached = generate(model, prompt, n, temperature=0, eos_id=eos)
    assert torch.equal(cached, generate_recompute(model, prompt, n, temperature=0, eos_id=eos))


@given(model_seeds, token_batches(), st.integers(1, 12))
def test_greedy_generation_is_deterministic_whatever_the_random_state(seed, prompt, n):
    model = tiny_model(seed)
    first = generate(model, prompt, n, temperature=0,
                     generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed + 1)
    second = generate(model, prompt, n, temperature=0,
                      generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    assert first.shape == (prompt.shape[0], prompt.shape[1] + n)


@given(model_seeds, token_batches(), st.integers(1, 12), seeds,
       st.sampled_from([None, 3]))
def test_sampling_with_equal_generators_gives_equal_cached_and_recompute_tokens(
        seed, prompt, n, sample_seed, top_k):
    model = tiny_model(seed, eos_boost=1.0)
    kwargs = dict(temperature=0.8, top_k=top_k, eos_id=EOS)
    cached = generate(model, prompt, n, generator=torch.Generator().manual_seed(sample_seed),
                      **kwargs)
    again = generate(model, prompt, n, generator=torch.Generator().manual_seed(sample_seed),
                     **kwargs)
    recomputed = generate_recompute(
        model, prompt, n, generator=torch.Generator().manual_seed(sample_seed), **kwargs)
    assert torch.equal(cached, again)
    assert torch.equal(cached, recomputed)


@given(model_seeds, token_batches(), st.integers(1, 12), seeds)
def test_top_k_one_sampling_is_greedy_decoding(seed, prompt, n, sample_seed):
    model = tiny_model(seed)
    sampled = generate(model, prompt, n, temperature=1.5, top_k=1,
                       generator=torch.Generator().manual_seed(sample_seed))
    assert torch.equal(sampled, generate(model, prompt, n, temperature=0))


@given(model_seeds, token_batches(), st.integers(1, 15), seeds)
@example(0, torch.tensor([[EOS, 1], [2, EOS]]), 15, 0)  # EOS in the prompt does not end it
def test_nothing_is_generated_after_eos(seed, prompt, n, sample_seed):
    model = tiny_model(seed, eos_boost=3.0)
    out = decode(model, prompt, n, eos_id=EOS, generator=torch.Generator().manual_seed(sample_seed))
    p = prompt.shape[1]
    assert torch.equal(out.tokens[:, :p], prompt)
    for row, length in zip(out.tokens[:, p:], out.lengths.tolist(), strict=True):
        stop = first_eos(row)
        if stop is None:
            assert length == n
        else:
            assert length == stop + 1
            assert bool((row[stop:] == EOS).all())
    assert out.tokens.shape[1] == p + int(out.lengths.max())


def test_the_call_stops_once_every_sequence_has_ended():
    model = tiny_model(0, eos_boost=50.0)  # EOS is every row's first token
    out = decode(model, torch.zeros(3, 4, dtype=torch.int64), 30, temperature=0, eos_id=EOS)
    assert out.tokens.shape == (3, 5)
    assert out.lengths.tolist() == [1, 1, 1]
    assert out.work == Work(3 * 4 * TINY.n_layers, 3 * 4 * TINY.n_layers, 3 * 4 * TINY.n_layers)


@given(model_seeds, token_batches(), st.integers(1, 12))
def test_each_row_of_a_batch_is_generated_as_if_it_were_alone(seed, prompt, n):
    model = tiny_model(seed, eos_boost=2.0)
    batch = decode(model, prompt, n, temperature=0, eos_id=EOS)
    for i in range(prompt.shape[0]):
        alone = decode(model, prompt[i:i + 1], n, temperature=0, eos_id=EOS)
        length = int(alone.lengths[0])
        assert int(batch.lengths[i]) == length
        assert torch.equal(batch.tokens[i, :alone.tokens.shape[1]], alone.tokens[0])


@given(model_seeds, token_batches(), st.integers(1, 12))
def test_cached_work_counts_each_fed_token_once_per_layer(seed, prompt, n):
    model = tiny_model(seed, eos_boost=2.0)
    out = decode(model, prompt, n, temperature=0, eos_id=EOS)
    # every prompt token and every generated token but each row's last is fed through step
    fed = sum(prompt.shape[1] + length - 1 for length in out.lengths.tolist())
    expected = fed * TINY.n_layers
    assert out.work == Work(expected, expected, expected)


@given(model_seeds, token_batches(), st.integers(1, 12))
def test_recompute_work_counts_every_position_of_every_prefix(seed, prompt, n):
    model = tiny_model(seed, eos_boost=2.0)
    out = decode(model, prompt, n, temperature=0, eos_id=EOS, use_cache=False)
    p = prompt.shape[1]
    positions = sum(p + j for length in out.lengths.tolist() for j in range(length))
    assert out.work.positions == positions * TINY.n_layers


@given(model_seeds, token_batches(max_batch=2), st.integers(0, TINY.vocab_size - 1),
       st.integers(0, TINY.vocab_size - 1))
def test_branching_from_a_state_never_changes_it(seed, prompt, a, b):
    model = tiny_model(seed)
    with torch.no_grad():
        state = model.init_state(prompt.shape[0])
        for i in range(prompt.shape[1]):
            _, state = model.step(prompt[:, i], state)
        snapshot = [g.clone() for g in state.g]
        batch = prompt.shape[0]
        first, after_a = model.step(torch.full((batch,), a), state)
        model.step(torch.full((batch,), b), state)
        model.step(torch.full((batch,), b), after_a)
        again, _ = model.step(torch.full((batch,), a), state)
    for g, saved in zip(state.g, snapshot, strict=True):
        assert torch.equal(g, saved)
    assert torch.equal(first, again)
    with pytest.raises(FrozenInstanceError):
        state.g = ()


def test_zero_new_tokens_returns_the_prompt_without_running_the_model():
    prompt = torch.tensor([[1, 2, 3]])
    out = decode(tiny_model(0), prompt, 0)
    assert torch.equal(out.tokens, prompt)
    assert out.lengths.tolist() == [0]
    assert out.work == Work()


BAD_ARGUMENTS = [
    (dict(prompt=torch.tensor([[1.0, 2.0]])), TypeError, "int64"),
    (dict(prompt=torch.tensor([1, 2])), ValueError, "shape"),
    (dict(prompt=torch.tensor([[1, 99]])), ValueError, r"\[0, 17\)"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=18), ValueError, "top_k"),
    (dict(eos_id=17), ValueError, "eos_id"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(generator=0), TypeError, "generator"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_ARGUMENTS)
@pytest.mark.parametrize("fn", [generate, generate_recompute])
def test_bad_arguments_raise_a_clear_error(fn, change, error, message):
    args = dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=3) | change
    with pytest.raises(error, match=message):
        fn(tiny_model(0), **args)


def test_a_model_without_a_decode_state_is_rejected():
    with pytest.raises(TypeError, match="init_state"):
        generate(torch.nn.Linear(2, 2), torch.tensor([[1]]), 2)


@pytest.mark.parametrize("fn", [generate, generate_recompute])
def test_nan_logits_raise_instead_of_being_sampled(fn):
    model = LanguageModel(TINY).double().eval()
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        fn(model, torch.tensor([[1, 2]]), 3)
