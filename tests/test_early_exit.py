"""Properties of early exit (bk/adaptive/early_exit.py) against float64 oracles."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench.registry import get
from bk.adaptive.early_exit import EarlyExitLanguageModel
from bk.core import resolvent_diag_loop
from bk.model import H0_DIAGONAL, LanguageModel, ModelConfig

CFG = ModelConfig(vocab_size=17, d_model=16, n_layers=3, n_seq=16, n_experts=2, d_expert=16,
                  bk_channels=2)
LAYERS = CFG.n_layers

seeds = st.integers(0, 2**16)
thresholds = st.floats(0.0, 1.0)
min_layers = st.integers(1, LAYERS)


@st.composite
def token_batches(draw, max_batch=3, max_len=CFG.n_seq):
    b = draw(st.integers(1, max_batch))
    n = draw(st.integers(1, max_len))
    values = draw(st.lists(st.integers(0, CFG.vocab_size - 1), min_size=b * n, max_size=b * n))
    return torch.tensor(values, dtype=torch.int64).view(b, n)


def tiny_model(seed: int, threshold: float = 0.9, min_exit_layer: int = 1,
               dtype: torch.dtype = torch.float64) -> EarlyExitLanguageModel:
    """A random model whose predictions are sharp enough that thresholds in [0, 1] all matter."""
    torch.manual_seed(seed)
    model = EarlyExitLanguageModel(CFG, exit_threshold=threshold, min_exit_layer=min_exit_layer)
    with torch.no_grad():
        model.head.weight.mul_(6.0)
        for norm in model.exit_norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
    return model.to(dtype).eval()


@torch.no_grad()
def masked_reference(model: EarlyExitLanguageModel, idx: torch.Tensor):
    """Every token runs every layer; exited tokens' updates and potentials are masked out.

    The recurrence is the Python-loop oracle of bk/core.py eq. (1). Returns (logits, exit layer).
    """
    x = model.embed(idx)
    running = torch.ones(idx.shape, dtype=torch.bool)
    logits = torch.zeros(*idx.shape, CFG.vocab_size, dtype=x.dtype)
    exit_layer = torch.full(idx.shape, LAYERS)
    for layer, block in enumerate(model.blocks, start=1):
        h = block.norm(x)
        f = block.moe(h.reshape(-1, CFG.d_model))[0].view_as(x)
        v = torch.where(running[..., None], block.potential(h), 0.0)
        a = (H0_DIAGONAL + v).transpose(1, 2)
        ones = a.new_ones(*a.shape[:-1], a.shape[-1] - 1)
        g = resolvent_diag_loop(a, ones, ones, block.shift(), causal=True).transpose(1, 2)
        x = torch.where(running[..., None], x + f + block.mix(g), x)
        if model.min_exit_layer <= layer < LAYERS:
            exit_logits = model.head(model.exit_norms[layer - 1](x))
            exits = running & (torch.softmax(exit_logits, -1).amax(-1) >= model.exit_threshold)
            logits = torch.where(exits[..., None], exit_logits, logits)
            exit_layer[exits] = layer
            running = running & ~exits
    logits = torch.where(running[..., None], model.head(model.norm(x)), logits)
    return logits, exit_layer


@given(seeds, token_batches(), min_layers)
def test_threshold_above_one_reproduces_the_full_model_exactly(seed, idx, min_exit_layer):
    model = tiny_model(seed, threshold=1.01, min_exit_layer=min_exit_layer, dtype=torch.float32)
    dense = LanguageModel(CFG).eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        out, full = model(idx, idx), dense(idx, idx)
    assert torch.equal(out.logits, full.logits)
    assert torch.equal(out.ce, full.ce)
    assert out.work == full.work
    assert bool((out.stats["exit_layer"] == LAYERS).all())


@given(seeds, token_batches(), min_layers)
def test_threshold_zero_exits_every_token_at_min_exit_layer(seed, idx, min_exit_layer):
    model = tiny_model(seed, threshold=0.0, min_exit_layer=min_exit_layer)
    with torch.no_grad():
        out = model(idx)
    assert bool((out.stats["exit_layer"] == min_exit_layer).all())
    assert out.work.token_layers == idx.numel() * min_exit_layer


@given(seeds, token_batches(), thresholds, min_layers)
def test_exit_layer_lies_between_min_exit_layer_and_the_last_layer(seed, idx, threshold,
                                                                    min_exit_layer):
    with torch.no_grad():
        exit_layer = tiny_model(seed, threshold, min_exit_layer)(idx).stats["exit_layer"]
    assert exit_layer.shape == idx.shape
    assert bool((exit_layer >= min_exit_layer).all()) and bool((exit_layer <= LAYERS).all())


@given(seeds, token_batches(), thresholds, min_layers)
def test_skipping_equals_the_masked_dense_reference_in_float64(seed, idx, threshold,
                                                              min_exit_layer):
    model = tiny_model(seed, threshold, min_exit_layer)
    with torch.no_grad():
        out = model(idx)
    logits, exit_layer = masked_reference(model, idx)
    assert torch.equal(out.stats["exit_layer"], exit_layer.to(torch.float64))
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)


@given(seeds, token_batches(), thresholds, min_layers)
def test_work_counts_exactly_the_token_layers_and_positions_that_ran(seed, idx, threshold,
                                                                     min_exit_layer):
    with torch.no_grad():
        out = tiny_model(seed, threshold, min_exit_layer)(idx)
    exit_layer = out.stats["exit_layer"].long()
    assert out.work.token_layers == int(exit_layer.sum())
    assert out.work.expert_calls == out.work.token_layers
    # Layer l visits, in each sequence with a token still running at l, the positions up to
    # the last running one of the batch.
    positions = 0
    for layer in range(1, LAYERS + 1):
        running = exit_layer >= layer
        if running.any():
            last = int(running.any(0).nonzero().max()) + 1
            positions += int(running.any(1).sum()) * last
    assert out.work.positions == positions


@given(seeds, token_batches(max_batch=4), thresholds, min_layers)
def test_a_sequence_result_does_not_depend_on_the_others_in_its_batch(seed, idx, threshold,
                                                                      min_exit_layer):
    model = tiny_model(seed, threshold, min_exit_layer)
    with torch.no_grad():
        batch = model(idx)
        for row in range(idx.shape[0]):
            alone = model(idx[row:row + 1])
            assert torch.equal(alone.stats["exit_layer"][0], batch.stats["exit_layer"][row])
            torch.testing.assert_close(alone.logits[0], batch.logits[row], rtol=1e-12,
                                       atol=1e-12)


@given(seeds, token_batches(), thresholds, min_layers, st.data())
def test_logits_and_exits_at_a_position_do_not_depend_on_later_tokens(seed, idx, threshold,
                                                                      min_exit_layer, data):
    model = tiny_model(seed, threshold, min_exit_layer)
    cut = data.draw(st.integers(1, idx.shape[1]))
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a.stats["exit_layer"][:, :cut], b.stats["exit_layer"][:, :cut])
    torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut], rtol=1e-12, atol=1e-12)


@given(seeds, token_batches(), thresholds, thresholds, min_layers)
def test_the_first_position_never_exits_later_when_the_threshold_loosens(seed, idx, t1, t2,
                                                                         min_exit_layer):
    # Position 0 has no causal prefix, so its hidden states do not depend on other tokens'
    # exits and its exit layer is monotone in the threshold.
    low, high = sorted((t1, t2))
    model = tiny_model(seed, high, min_exit_layer)
    with torch.no_grad():
        strict = model(idx).stats["exit_layer"][:, 0]
        model.exit_threshold = low
        loose = model(idx).stats["exit_layer"][:, 0]
    assert bool((loose <= strict).all())


@given(seeds, token_batches(), thresholds, thresholds, min_layers)
def test_without_sequence_mixing_no_token_exits_later_when_the_threshold_loosens(
        seed, idx, t1, t2, min_exit_layer):
    # With the BK readout switched off, tokens do not interact, so the exit layer is monotone
    # per token (and hence on average). With mixing it is not in general: see the module doc.
    low, high = sorted((t1, t2))
    model = tiny_model(seed, high, min_exit_layer)
    with torch.no_grad():
        for block in model.blocks:
            block.readout.weight.zero_()
        strict = model(idx).stats["exit_layer"]
        model.exit_threshold = low
        loose = model(idx).stats["exit_layer"]
    assert bool((loose <= strict).all())
    assert float(loose.mean()) <= float(strict.mean())


def test_with_sequence_mixing_a_token_can_exit_later_when_the_threshold_loosens():
    # The counterexample behind the module doc: lowering the threshold from 0.55 to 0.5 lets
    # position 0 exit after layer 1 instead of 2, its potential in layer 2 becomes 0, and the
    # changed recurrence makes position 1 less confident, so it exits later.
    model = tiny_model(68, 0.55)
    idx = torch.randint(0, CFG.vocab_size, (1, 16), generator=torch.Generator().manual_seed(68))
    with torch.no_grad():
        for block in model.blocks:
            block.readout.weight.mul_(5.0)
        strict = model(idx).stats["exit_layer"]
        model.exit_threshold = 0.5
        loose = model(idx).stats["exit_layer"]
    assert loose[0, 0] < strict[0, 0]
    assert loose[0, 1] > strict[0, 1]
    assert float(loose.mean()) <= float(strict.mean())


@given(seeds, token_batches(max_len=8), thresholds, min_layers)
def test_step_by_step_decoding_matches_the_forward_pass(seed, idx, threshold, min_exit_layer):
    model = tiny_model(seed, threshold, min_exit_layer)
    with torch.no_grad():
        full = model(idx).logits
        state = model.init_state(idx.shape[0])
        for i in range(idx.shape[1]):
            logits, state = model.step(idx[:, i], state)
            torch.testing.assert_close(logits, full[:, i], rtol=1e-10, atol=1e-10)


@given(seeds, min_layers)
def test_the_training_loss_reaches_every_exit_head_that_may_be_used(seed, min_exit_layer):
    model = tiny_model(seed, threshold=1.01, min_exit_layer=min_exit_layer).train()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.n_seq),
                        generator=torch.Generator().manual_seed(seed))
    model(idx, idx).loss.backward()
    for layer, norm in enumerate(model.exit_norms, start=1):
        reached = norm.weight.grad is not None and bool(norm.weight.grad.abs().sum() > 0)
        assert reached == (layer >= min_exit_layer)


def test_training_and_inference_compute_the_same_outputs():
    model = tiny_model(7, threshold=0.6)
    idx = torch.randint(0, CFG.vocab_size, (3, CFG.n_seq),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        inference = model(idx, idx)
        model.train()
        training = model(idx, idx)
    assert torch.equal(training.logits, inference.logits)
    assert torch.equal(training.stats["exit_layer"], inference.stats["exit_layer"])
    assert 1 < float(inference.stats["exit_layer"].mean()) < LAYERS


def test_dense_weights_load_leaving_only_the_exit_norms_new():
    model = EarlyExitLanguageModel(CFG)
    result = model.load_state_dict(LanguageModel(CFG).state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("exit_norms.") for k in result.missing_keys)


@pytest.mark.parametrize("settings, message", [
    ({"exit_threshold": float("nan")}, "exit_threshold"),
    ({"exit_threshold": -0.1}, "exit_threshold"),
    ({"min_exit_layer": 0}, "min_exit_layer"),
    ({"min_exit_layer": LAYERS + 1}, "min_exit_layer"),
    ({"exit_loss_weight": -1.0}, "exit_loss_weight"),
])
def test_bad_settings_are_rejected_with_a_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitLanguageModel(CFG, **settings)


def test_a_threshold_set_to_nan_after_construction_is_rejected_at_forward():
    model = tiny_model(0)
    model.exit_threshold = float("nan")
    with pytest.raises(ValueError, match="exit_threshold"):
        model(torch.zeros(1, 4, dtype=torch.int64))


def test_the_technique_is_registered_with_its_knobs():
    technique = get("early_exit")
    assert technique.defaults() == {"exit_threshold": 0.9, "min_exit_layer": 1}
    model = technique.make(CFG, {"exit_threshold": 0.8})
    assert isinstance(model, EarlyExitLanguageModel) and model.exit_threshold == 0.8
