"""Properties of early exit (bk/adaptive/early_exit.py) against float64 oracles."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bench.registry import get
from bk.adaptive.depth import forced_depths
from bk.adaptive.early_exit import EarlyExitLanguageModel
from bk.core import resolvent_diag_loop
from bk.model import H0_DIAGONAL, LanguageModel
from bk.technique import Forcing, KnobError
from tests.strategies import TINY as CFG
from tests.strategies import decode, random_tokens, seeds, token_batches

LAYERS = CFG.n_layers

batches = token_batches(max_len=CFG.n_seq)
thresholds = st.floats(0.0, 1.0)
min_layers = st.integers(1, LAYERS)


def exit_model(seed: int, threshold: float = 0.9,
               min_exit_layer: int = 1) -> EarlyExitLanguageModel:
    """A random float64 model whose predictions are sharp enough that thresholds in [0, 1] all
    matter. (Its exit norms are drawn in float32, then cast: the pinned seeds below rely on it.)"""
    torch.manual_seed(seed)
    model = EarlyExitLanguageModel(CFG, exit_threshold=threshold, min_exit_layer=min_exit_layer)
    with torch.no_grad():
        model.head.weight.mul_(6.0)
        for norm in model.exit_norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
    return model.double().eval()


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


@given(seeds, batches, min_layers)
def test_threshold_above_one_reproduces_the_full_model(seed, idx, min_exit_layer):
    model = exit_model(seed, threshold=1.01, min_exit_layer=min_exit_layer)
    dense = LanguageModel(CFG).double().eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        out, full = model(idx, idx), dense(idx, idx)
    torch.testing.assert_close(out.logits, full.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-12, atol=1e-12)
    assert out.work == full.work
    assert bool((out.stats["exit_layer"] == LAYERS).all())


@given(seeds, batches, min_layers)
def test_threshold_zero_exits_every_token_at_min_exit_layer(seed, idx, min_exit_layer):
    model = exit_model(seed, threshold=0.0, min_exit_layer=min_exit_layer)
    with torch.no_grad():
        out = model(idx)
    assert bool((out.stats["exit_layer"] == min_exit_layer).all())
    assert out.work.token_layers == idx.numel() * min_exit_layer


@given(seeds, batches, thresholds, min_layers)
def test_exit_layer_lies_between_min_exit_layer_and_the_last_layer(seed, idx, threshold,
                                                                    min_exit_layer):
    with torch.no_grad():
        exit_layer = exit_model(seed, threshold, min_exit_layer)(idx).stats["exit_layer"]
    assert exit_layer.shape == idx.shape
    assert bool((exit_layer >= min_exit_layer).all()) and bool((exit_layer <= LAYERS).all())


@given(seeds, batches, thresholds, min_layers)
def test_skipping_equals_the_masked_dense_reference_in_float64(seed, idx, threshold,
                                                              min_exit_layer):
    model = exit_model(seed, threshold, min_exit_layer)
    with torch.no_grad():
        out = model(idx)
    logits, exit_layer = masked_reference(model, idx)
    assert torch.equal(out.stats["exit_layer"], exit_layer.to(torch.float64))
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)


@given(seeds, batches, thresholds, min_layers)
def test_work_counts_exactly_the_token_layers_and_positions_that_ran(seed, idx, threshold,
                                                                     min_exit_layer):
    with torch.no_grad():
        out = exit_model(seed, threshold, min_exit_layer)(idx)
    exit_layer = out.stats["exit_layer"].long()
    assert out.work.token_layers == int(exit_layer.sum())
    assert out.work.expert_calls == out.work.token_layers
    # A layer's recurrence visits every position as long as one token of the batch runs it.
    assert out.work.positions == idx.numel() * int(exit_layer.max())


@given(seeds, token_batches(max_batch=4, max_len=CFG.n_seq), thresholds, min_layers)
def test_a_sequence_result_does_not_depend_on_the_others_in_its_batch(seed, idx, threshold,
                                                                      min_exit_layer):
    model = exit_model(seed, threshold, min_exit_layer)
    with torch.no_grad():
        batch = model(idx)
        for row in range(idx.shape[0]):
            alone = model(idx[row:row + 1])
            assert torch.equal(alone.stats["exit_layer"][0], batch.stats["exit_layer"][row])
            torch.testing.assert_close(alone.logits[0], batch.logits[row], rtol=1e-12,
                                       atol=1e-12)


@given(seeds, batches, thresholds, min_layers, st.data())
def test_logits_and_exits_at_a_position_do_not_depend_on_later_tokens(seed, idx, threshold,
                                                                      min_exit_layer, data):
    model = exit_model(seed, threshold, min_exit_layer)
    cut = data.draw(st.integers(1, idx.shape[1]))
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a.stats["exit_layer"][:, :cut], b.stats["exit_layer"][:, :cut])
    torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut], rtol=1e-12, atol=1e-12)


@given(seeds, batches, thresholds, thresholds, min_layers)
def test_the_first_position_never_exits_later_when_the_threshold_loosens(seed, idx, t1, t2,
                                                                         min_exit_layer):
    # Position 0 has no causal prefix, so its hidden states do not depend on other tokens'
    # exits and its exit layer is monotone in the threshold.
    low, high = sorted((t1, t2))
    model = exit_model(seed, high, min_exit_layer)
    with torch.no_grad():
        strict = model(idx).stats["exit_layer"][:, 0]
        model.exit_threshold = low
        loose = model(idx).stats["exit_layer"][:, 0]
    assert bool((loose <= strict).all())


@given(seeds, batches, thresholds, thresholds, min_layers)
def test_without_sequence_mixing_no_token_exits_later_when_the_threshold_loosens(
        seed, idx, t1, t2, min_exit_layer):
    # With the BK readout switched off, tokens do not interact, so the exit layer is monotone
    # per token (and hence on average). With mixing it is not in general: see the module doc.
    low, high = sorted((t1, t2))
    model = exit_model(seed, high, min_exit_layer)
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
    model = exit_model(68, 0.55)
    idx = random_tokens(68, 1, 16)
    with torch.no_grad():
        for block in model.blocks:
            block.readout.weight.mul_(5.0)
        strict = model(idx).stats["exit_layer"]
        model.exit_threshold = 0.5
        loose = model(idx).stats["exit_layer"]
    assert loose[0, 0] < strict[0, 0]
    assert loose[0, 1] > strict[0, 1]
    assert float(loose.mean()) <= float(strict.mean())


# Seed 2 at threshold 0.7 on these tokens: at every position the rows of the batch exit at
# different layers (checked below), the case where only some rows' state must be frozen.
MIXED_SEED, MIXED_THRESHOLD = 2, 0.7
MIXED = random_tokens(2, 3, 6)


def test_the_fixed_example_exits_rows_of_every_position_at_different_layers():
    with torch.no_grad():
        exit_layer = exit_model(MIXED_SEED, MIXED_THRESHOLD)(MIXED).stats["exit_layer"]
    for position in range(MIXED.shape[1]):
        assert len(set(exit_layer[:, position].tolist())) >= 2, position
    assert set(exit_layer.flatten().tolist()) == {1.0, 2.0, 3.0}


@given(seeds, token_batches(max_len=8), thresholds, min_layers)
@example(MIXED_SEED, MIXED, MIXED_THRESHOLD, 1)
def test_step_by_step_decoding_matches_the_forward_pass(seed, idx, threshold, min_exit_layer):
    model = exit_model(seed, threshold, min_exit_layer)
    with torch.no_grad():
        full = model(idx).logits
    torch.testing.assert_close(decode(model, idx)[0], full, rtol=1e-10, atol=1e-10)


@given(seeds, min_layers)
def test_the_training_loss_reaches_every_exit_head_that_may_be_used(seed, min_exit_layer):
    model = exit_model(seed, threshold=1.01, min_exit_layer=min_exit_layer).train()
    idx = random_tokens(seed, 2, CFG.n_seq)
    model(idx, idx).loss.backward()
    for layer, norm in enumerate(model.exit_norms, start=1):
        reached = norm.weight.grad is not None and bool(norm.weight.grad.abs().sum() > 0)
        assert reached == (layer >= min_exit_layer)


def test_training_and_inference_compute_the_same_outputs():
    model = exit_model(7, threshold=0.6)
    idx = random_tokens(1, 3, CFG.n_seq)
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
    ({"exit_threshold": float("nan")}, "knob exit_threshold"),
    ({"exit_threshold": -0.1}, "knob exit_threshold"),
    ({"exit_threshold": "high"}, "knob exit_threshold"),
    ({"min_exit_layer": 0}, "knob min_exit_layer"),
    ({"min_exit_layer": 2.5}, "knob min_exit_layer: expected an integer"),
    ({"min_exit_layer": LAYERS + 1}, r"knob min_exit_layer: expected an integer in \[1, n_layers"),
    ({"exit_loss_weight": -1.0}, "knob exit_loss_weight"),
    ({"exit_loss_weight": math.inf}, "knob exit_loss_weight"),
])
def test_bad_knobs_are_rejected_with_an_error_naming_the_knob(settings, message):
    with pytest.raises(KnobError, match=message):
        EarlyExitLanguageModel(CFG, **settings)
    with pytest.raises(KnobError, match=message):
        EarlyExitLanguageModel.from_knobs(CFG, settings)


def test_a_threshold_set_to_nan_after_construction_is_rejected_at_forward():
    model = exit_model(0)
    model.exit_threshold = float("nan")
    with pytest.raises(KnobError, match="exit_threshold"):
        model(torch.zeros(1, 4, dtype=torch.int64))


def test_the_technique_is_registered_with_its_knobs():
    technique = get("early_exit")
    assert technique.model is EarlyExitLanguageModel
    assert technique.defaults() == {"exit_threshold": 0.9, "min_exit_layer": 1,
                                    "exit_loss_weight": 1.0}
    assert technique.model.knob("exit_threshold").grid == (0.7, 0.8, 0.9, 0.95)
    assert technique.model.knob("min_exit_layer").grid == (1, 2)
    model = technique.make(CFG, {"exit_threshold": 0.8, "min_exit_layer": "2"})
    assert isinstance(model, EarlyExitLanguageModel)
    assert model.knob_values() == {"exit_threshold": 0.8, "min_exit_layer": 2,
                                   "exit_loss_weight": 1.0}


# ---------------------------------------------------------------------------------------------
# Forcing (the ceiling)
# ---------------------------------------------------------------------------------------------


def counting_hooks(modules, rows):
    return [m.register_forward_hook(
        lambda module, args, out, i=i: rows.__setitem__(i, rows.get(i, 0) + args[0].shape[0]))
        for i, m in enumerate(modules)]


@given(seeds, batches, st.floats(0.05, 1.0), st.sampled_from(["uniform", "per_token"]),
       min_layers)
def test_a_forced_model_exits_at_the_given_depths_computing_no_confidence(
        seed, idx, keep, pattern, min_exit_layer):
    model = exit_model(seed, 0.5, min_exit_layer)
    forcing = Forcing(keep, pattern, seed)
    rows: dict[int, int] = {}
    handles = counting_hooks(model.exit_norms, rows)
    try:
        with torch.no_grad():
            out = model.forced(forcing)(idx)
    finally:
        for h in handles:
            h.remove()
    depths = forced_depths(forcing, LAYERS, idx.numel()).view(idx.shape)
    assert torch.equal(out.stats["exit_layer"], depths.to(torch.float64))
    assert out.work.token_layers == out.work.expert_calls == int(depths.sum())
    assert out.work.positions == idx.numel() * int(depths.max())
    # An exit head runs only for the tokens that leave there: it is their output layer.
    for layer in range(1, LAYERS):
        assert rows.get(layer - 1, 0) == int((depths == layer).sum()), layer
    assert model.forcing is None and model.DECODES  # the forced copy leaves the model alone


@pytest.mark.parametrize("depth", range(1, LAYERS + 1))
def test_a_forced_depth_equals_the_learned_exits_when_every_token_exits_there(depth):
    # Threshold 0 with min_exit_layer = depth exits every token after layer `depth`.
    model = exit_model(3, threshold=0.0, min_exit_layer=depth)
    with torch.no_grad():
        learned = model(MIXED)
        forced = model.forced(Forcing(depth / LAYERS))(MIXED)
    assert bool((learned.stats["exit_layer"] == depth).all())
    torch.testing.assert_close(forced.logits, learned.logits, rtol=0, atol=0)
    assert forced.work == learned.work


def test_a_forced_model_does_not_decode():
    forced = exit_model(0).forced(Forcing(0.5, "per_token"))
    with pytest.raises(NotImplementedError, match="forced"):
        forced.init_state(1)
