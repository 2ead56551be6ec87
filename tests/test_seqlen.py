"""Properties of the learned sequence length wrapper (bk/adaptive/seqlen.py)."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.registry import get
from bk.adaptive.seqlen import (
    PREDICTOR_GAIN,
    LengthAdaptiveModel,
    length_bins,
    pad_positions,
    truncate_positions,
)
from bk.model import LanguageModel
from bk.technique import Forcing, KnobError
from tests.strategies import TINY, decode, random_tokens, seeds, token_batches

CFG = replace(TINY, n_seq=48)  # three length bins
BINS = (16, 32, 48)

batches = token_batches(max_batch=4, max_len=CFG.n_seq)


@st.composite
def lengths_for(draw, idx):
    n = idx.shape[1]
    return torch.tensor(draw(st.lists(st.integers(1, n), min_size=idx.shape[0],
                                      max_size=idx.shape[0])))


def length_model(seed: int, dtype: torch.dtype = torch.float64,
                 **kwargs) -> LengthAdaptiveModel:
    torch.manual_seed(seed)
    model = LengthAdaptiveModel(CFG, **kwargs)
    with torch.no_grad():
        model.fallback_counts.uniform_(1.0, 100.0)
    return model.to(dtype).eval()


def deciding(model: LengthAdaptiveModel, seed: int = 0) -> LengthAdaptiveModel:
    """``model`` with a random predictor, so that sequences stop at different boundaries."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.length_predictor.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def base_of(model: LengthAdaptiveModel) -> LanguageModel:
    base = LanguageModel(CFG).to(model.embed.weight.dtype).eval()
    base.load_state_dict(model.state_dict(), strict=False)
    return base


def test_length_bins_step_by_16_and_end_at_n_seq():
    assert length_bins(48) == BINS
    assert length_bins(40) == (16, 32, 40)
    assert length_bins(8) == (8,)
    assert length_model(0).bins == BINS


@given(st.integers(1, 3), st.integers(1, 10), st.integers(0, 6), st.integers(1, 4))
def test_pad_then_truncate_returns_the_input_exactly(b, n, extra, v):
    t = torch.randn(b, n, v)
    fill = torch.randn(v)
    padded = pad_positions(t, n + extra, fill)
    assert padded.shape == (b, n + extra, v)
    assert torch.equal(truncate_positions(padded, n), t)
    assert bool((padded[:, n:] == fill).all())


@given(st.integers(1, 3), st.integers(1, 10), st.data())
def test_truncate_then_restore_gives_the_original_shape(b, n, data):
    length = data.draw(st.integers(1, n))
    t = torch.randn(b, n, 5)
    restored = pad_positions(truncate_positions(t, length), n, torch.zeros(5))
    assert restored.shape == t.shape
    assert torch.equal(restored[:, :length], t[:, :length])


@given(seeds, batches)
def test_a_fresh_predictor_chooses_the_full_length_so_the_candidate_starts_as_the_base(seed, idx):
    torch.manual_seed(seed)
    model = LengthAdaptiveModel(CFG).eval()
    with torch.no_grad():
        out, base = model(idx, idx), base_of(model)(idx, idx)
    assert bool((out.stats["length"] == idx.shape[1]).all())
    assert torch.equal(out.logits, base.logits)


@given(seeds, batches)
def test_at_full_length_the_wrapper_equals_the_base_model_exactly(seed, idx):
    model = length_model(seed, dtype=torch.float32)
    full = torch.full((idx.shape[0],), idx.shape[1])
    with torch.no_grad():
        out, base = model.run_at_lengths(idx, full, idx), base_of(model)(idx, idx)
    assert torch.equal(out.logits, base.logits)
    assert torch.equal(out.ce, base.ce)
    assert out.work == base.work


@given(seeds, batches, st.data())
def test_truncation_leaves_the_outputs_below_the_length_unchanged(seed, idx, data):
    model = length_model(seed)
    lengths = data.draw(lengths_for(idx))
    with torch.no_grad():
        out = model.run_at_lengths(idx, lengths)
        base = base_of(model)(idx)
        for row, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(out.logits[row, :length], base.logits[row, :length],
                                       rtol=1e-12, atol=1e-12)


@given(seeds, batches, st.data())
def test_every_uncomputed_position_is_scored_on_the_unigram_fallback(seed, idx, data):
    model = length_model(seed)
    lengths = data.draw(lengths_for(idx))
    with torch.no_grad():
        out = model.run_at_lengths(idx, lengths, idx)
        fallback = model.fallback()
        for row, length in enumerate(lengths.tolist()):
            assert bool((out.logits[row, length:] == fallback).all())
        log_probs = torch.log_softmax(out.logits, dim=-1)
        nll = -log_probs.gather(-1, idx[..., None]).mean()
    assert out.logits.shape == (*idx.shape, CFG.vocab_size)
    torch.testing.assert_close(out.ce, nll, rtol=1e-12, atol=1e-12)


@given(seeds, batches, st.data())
def test_the_work_counter_scales_with_the_computed_length(seed, idx, data):
    model = length_model(seed)
    lengths = data.draw(lengths_for(idx))
    with torch.no_grad():
        out = model.run_at_lengths(idx, lengths)
    computed = int(lengths.sum())
    assert out.work.token_layers == computed * CFG.n_layers
    assert out.work.expert_calls == computed * CFG.n_layers
    assert out.work.positions == computed * CFG.n_layers
    assert torch.equal(out.stats["length"][:, 0], lengths.to(torch.float64))
    assert float(out.stats["layers_per_token"].sum()) == computed * CFG.n_layers


@given(seeds, batches)
def test_a_sequence_result_does_not_depend_on_the_others_in_its_batch(seed, idx):
    model = deciding(length_model(seed), seed)
    with torch.no_grad():
        batch = model(idx)
        for row in range(idx.shape[0]):
            alone = model(idx[row:row + 1])
            assert torch.equal(alone.stats["length"][0], batch.stats["length"][row])
            torch.testing.assert_close(alone.logits[0], batch.logits[row], rtol=1e-12,
                                       atol=1e-12)


@given(seeds, st.floats(0.0, 2.0))
def test_bin_costs_from_one_full_pass_equal_the_loss_of_really_truncating(seed, penalty):
    model = length_model(seed, length_penalty=penalty)
    idx = random_tokens(seed, 3, CFG.n_seq)
    with torch.no_grad():
        full = base_of(model)(idx).logits
        model_nll = torch.nn.functional.cross_entropy(full.transpose(1, 2), idx,
                                                      reduction="none")
        fallback_nll = -model.fallback()[idx]
        cost = model.bin_cost(model_nll, fallback_nll)
        for k, length in enumerate(BINS):
            for row in range(3):
                truncated = model.run_at_lengths(idx[row:row + 1], torch.tensor([length]),
                                                 idx[row:row + 1])
                expected = truncated.ce + penalty * length / CFG.n_seq
                torch.testing.assert_close(cost[row, k], expected, rtol=1e-10, atol=1e-10)


@given(seeds)
def test_the_gradient_reaches_the_predictor(seed):
    model = length_model(seed, dtype=torch.float32).train()
    idx = random_tokens(seed, 4, CFG.n_seq)
    model(idx, idx).loss.backward()
    for p in (model.length_predictor.weight, model.length_predictor.bias):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(p.grad.abs().sum()) > 0


@given(batches)
def test_the_fallback_is_the_add_one_unigram_of_the_training_targets(idx):
    model = LengthAdaptiveModel(CFG).train()
    model(idx, idx)
    model(idx, idx)
    counts = 1.0 + 2.0 * torch.bincount(idx.reshape(-1), minlength=CFG.vocab_size)
    torch.testing.assert_close(model.fallback(), torch.log(counts / counts.sum()))
    model.eval()(idx, idx)
    torch.testing.assert_close(model.fallback(), torch.log(counts / counts.sum()))


@settings(max_examples=6)
@given(seeds, st.floats(0.0, 2.0))
def test_training_runs_at_full_length_and_charges_the_predictor_the_sampled_lengths_cost(
        seed, penalty):
    model = deciding(length_model(seed, length_penalty=penalty), seed).train()
    idx = random_tokens(seed, 6, CFG.n_seq)
    torch.manual_seed(seed)
    out = model(idx, idx)
    with torch.no_grad():
        base = base_of(model).train()(idx, idx)
        lengths = out.stats["length"][:, 0].long()
        model.eval()
        charged = [model.run_at_lengths(idx[r:r + 1], lengths[r:r + 1], idx[r:r + 1]).ce
                   + penalty * int(lengths[r]) / CFG.n_seq for r in range(idx.shape[0])]
    torch.testing.assert_close(out.logits, base.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.ce, base.ce, rtol=0, atol=0)
    assert set(out.aux) == {"balance", "length"}
    torch.testing.assert_close(out.aux["length"], torch.stack(charged).mean(), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(out.loss, out.ce + out.aux["balance"] + out.aux["length"])


@pytest.mark.parametrize("penalty, fallback_peak, shorter", [(20.0, 1.0, True),
                                                             (0.0, 1e12, False)])
def test_predictor_training_moves_the_expected_length_towards_the_cheapest_bin(
        penalty, fallback_peak, shorter):
    # Targets avoid token 0. A uniform fallback costs about as much as the random model, so a
    # large penalty makes the shortest bin cheapest; a fallback peaked on token 0 makes every
    # uncomputed position very costly, so without a penalty the full length is cheapest.
    model = length_model(11, dtype=torch.float32, length_penalty=penalty)
    with torch.no_grad():
        model.fallback_counts.fill_(1.0)
        model.fallback_counts[0] = fallback_peak
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(1, CFG.vocab_size, (8, CFG.n_seq), generator=generator)
    targets = torch.randint(1, CFG.vocab_size, (8, CFG.n_seq), generator=generator)
    for p in model.parameters():
        p.requires_grad_(p is model.length_predictor.weight or p is model.length_predictor.bias)
    bins = torch.tensor(BINS, dtype=torch.float32)

    def expected_length() -> float:
        with torch.no_grad():
            return float((model.length_probabilities(idx) * bins).sum(-1).mean())

    before = expected_length()
    optimizer = torch.optim.SGD(model.length_predictor.parameters(), lr=0.01)
    model.train()
    torch.manual_seed(0)
    for _ in range(20):
        optimizer.zero_grad()
        model(idx, targets).loss.backward()
        optimizer.step()
    after = expected_length()
    assert (after < before - 1.0) if shorter else (after > before + 1.0)


def test_bad_lengths_are_rejected_with_a_clear_error():
    model = length_model(0)
    idx = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="lengths"):
        model.run_at_lengths(idx, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="lengths"):
        model.run_at_lengths(idx, torch.tensor([9, 4]))
    with pytest.raises(ValueError, match="lengths"):
        model.run_at_lengths(idx, torch.tensor([4]))


@pytest.mark.parametrize("kwargs, message", [
    ({"length_penalty": -0.1}, "knob length_penalty"),
    ({"length_penalty": float("nan")}, "knob length_penalty"),
    ({"length_penalty": "long"}, "knob length_penalty"),
    ({"length_penalty": True}, "knob length_penalty"),
    ({"gumbel_tau": 0.0}, "gumbel_tau"),
])
def test_bad_settings_are_rejected_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthAdaptiveModel(CFG, **kwargs)
    if "length_penalty" in kwargs:
        with pytest.raises(KnobError, match=message):
            get("seqlen").make(CFG, kwargs)


def test_dense_weights_load_leaving_only_the_predictor_and_fallback_new():
    model = LengthAdaptiveModel(CFG)
    result = model.load_state_dict(LanguageModel(CFG).state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["fallback_counts", "length_predictor.bias",
                                           "length_predictor.weight"]


def test_the_technique_is_registered_with_its_knob():
    technique = get("seqlen")
    assert technique.defaults() == {"length_penalty": 0.1}
    model = technique.make(CFG, {"length_penalty": 0.5})
    assert isinstance(model, LengthAdaptiveModel) and model.length_penalty == 0.5


# -- causal decisions and decoding -----------------------------------------------------------


def lengths_by_a_loop(model: LengthAdaptiveModel, idx: torch.Tensor) -> list[int]:
    """The documented rule in float64, one sequence and boundary at a time: stop at the first
    boundary L < N whose score from the mean embedding of tokens 0..L-1 is positive."""
    embedded = model.embed(idx).detach().double()
    weight = model.length_predictor.weight.detach().double()
    bias = model.length_predictor.bias.detach().double()
    lengths = []
    for row in embedded:
        length = idx.shape[1]
        for j, boundary in enumerate(model.bins[:-1]):
            if boundary >= idx.shape[1]:
                break
            mean = row[:boundary].sum(dim=0) / boundary
            if PREDICTOR_GAIN * (float(weight[j] @ mean) + float(bias[j])) > 0:
                length = boundary
                break
        lengths.append(length)
    return lengths


@given(seeds, batches)
def test_a_sequence_stops_at_the_first_boundary_whose_prefix_says_stop(seed, idx):
    model = deciding(length_model(seed), seed)
    with torch.no_grad():
        out = model(idx)
    assert out.stats["length"][:, 0].long().tolist() == lengths_by_a_loop(model, idx)


@given(seeds, st.integers(0, CFG.n_seq - 2))
def test_logits_at_a_position_never_depend_on_later_tokens(seed, i):
    # Half the sequences of a deciding predictor stop at some boundary; changing the tokens
    # after i must change nothing up to i: neither the model's logits nor the decision to stop.
    model = deciding(length_model(seed), seed)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (8, CFG.n_seq), generator=generator)
    changed = idx.clone()
    changed[:, i + 1:] = torch.randint(0, CFG.vocab_size, (8, CFG.n_seq - i - 1),
                                       generator=generator)
    with torch.no_grad():
        a, b = model(idx).logits[:, :i + 1], model(changed).logits[:, :i + 1]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=8)
@given(seeds, st.integers(1, 4), st.integers(1, CFG.n_seq))
def test_decoding_one_position_at_a_time_equals_the_forward_pass(seed, b, n):
    model = deciding(length_model(seed), seed)
    idx = random_tokens(seed, b, n)
    with torch.no_grad():
        full = model(idx).logits
    torch.testing.assert_close(decode(model, idx)[0], full, rtol=1e-10, atol=1e-10)


def test_decoding_stops_computing_a_stopped_sequence():
    model = deciding(length_model(1), 1)
    with torch.no_grad():
        model.length_predictor.bias.fill_(1.0)  # every sequence stops at the first boundary
    rows = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    for block in model.blocks:
        block.step = _counting(block.step, rows)
    idx = random_tokens(0, 3, 20)
    with torch.no_grad():
        state = model.init_state(3)
        for t in range(20):
            logits, state = model.step(idx[:, t], state)
    assert rows == [3] * 16 * CFG.n_layers  # positions 16.. are not computed
    assert bool((logits == model.fallback()).all())


def _counting(step, rows):
    def counted(x, g):
        rows.append(x.shape[0])
        return step(x, g)
    return counted


# -- forcing ----------------------------------------------------------------------------------


def no_predictor(model: LengthAdaptiveModel) -> LengthAdaptiveModel:
    """``model`` whose length predictor fails if it is consulted."""
    def fail(*args):
        raise AssertionError("the length predictor ran in a forced model")

    model.stop_score = fail
    model.length_predictor.register_forward_pre_hook(fail)
    return model


@pytest.mark.parametrize("keep, length", [(1.0, 48), (0.5, 32), (0.3, 16), (0.1, 16),
                                          (0.75, 32)])
def test_a_uniformly_forced_model_runs_every_sequence_at_the_same_bin(keep, length):
    model = no_predictor(deciding(length_model(0)))
    idx = torch.randint(0, CFG.vocab_size, (3, CFG.n_seq))
    forced = model.forced(Forcing(keep))
    with torch.no_grad():
        out = forced(idx)
    assert out.stats["length"][:, 0].tolist() == [length] * 3
    assert out.work.positions == out.work.token_layers == 3 * length * CFG.n_layers
    assert model.forcing is None


def test_a_per_token_forced_model_draws_lengths_per_sequence_at_the_requested_mean():
    model = no_predictor(length_model(0))
    b = 400
    idx = torch.randint(0, CFG.vocab_size, (b, CFG.n_seq))
    forced = model.forced(Forcing(0.6, "per_token", seed=2))
    lengths = forced.forced_lengths(b, CFG.n_seq)
    assert set(lengths.tolist()) <= set(BINS) and len(set(lengths.tolist())) > 1
    # Uniform on [0.6 N - w, 0.6 N + w] with w = 0.4 N, then rounded to a bin without bias.
    spread = (0.4 * CFG.n_seq) / 3 ** 0.5 + 16
    assert abs(float(lengths.double().mean()) - 0.6 * CFG.n_seq) <= 4 * spread / b ** 0.5
    with torch.no_grad():
        out = forced(idx[:8])
    assert out.work.positions == int(forced.forced_lengths(8, CFG.n_seq).sum()) * CFG.n_layers
    assert torch.equal(forced.forced_lengths(8, CFG.n_seq), forced.forced_lengths(8, CFG.n_seq))


@given(seeds, batches)
def test_forcing_the_full_length_reproduces_a_fresh_model(seed, idx):
    torch.manual_seed(seed)
    model = LengthAdaptiveModel(CFG).eval()
    with torch.no_grad():
        assert torch.equal(model.forced(Forcing(1.0))(idx).logits, model(idx).logits)


def test_a_single_bin_makes_no_decision_and_has_no_predictor():
    model = LengthAdaptiveModel(replace(TINY, n_layers=2))  # n_seq = 16: one bin
    assert model.length_predictor is None and model.forced(Forcing(0.5)) is None
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.n_seq))
    model.train()(idx, idx).loss.backward()
    with torch.no_grad():
        assert bool((model.eval()(idx).stats["length"] == 16).all())
