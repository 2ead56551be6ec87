"""Properties of Graves' halting rule and of the ACT language model (bk.adaptive.act)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.func import functional_call

from bench.registry import get
from bk.adaptive.act import ACTLanguageModel, halting
from bk.adaptive.depth import forced_depths
from bk.model import LanguageModel, ModelConfig
from bk.technique import Forcing, KnobError
from tests.strategies import TINY as CFG
from tests.strategies import decode, float64_model, random_tokens, seeds, token_batches

# ---------------------------------------------------------------------------------------------
# halting(p, threshold)
# ---------------------------------------------------------------------------------------------

probability = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.01, 0.5, 0.99, 1.0]))
threshold = st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.5, 0.9, 0.99, 1.0]))


@st.composite
def halting_probabilities(draw: st.DrawFn) -> torch.Tensor:
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    values = draw(st.lists(probability, min_size=steps * batch, max_size=steps * batch))
    return torch.tensor(values, dtype=torch.float64).view(steps, batch)


def steps_column(p: torch.Tensor) -> torch.Tensor:
    return torch.arange(1, p.shape[0] + 1).view(-1, 1)


@given(halting_probabilities(), threshold)
def test_weights_are_non_negative_and_sum_to_one_for_every_token(p, thr):
    weights, _, _ = halting(p, thr)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(0), torch.ones(p.shape[1], dtype=p.dtype),
                               rtol=0, atol=1e-12)


@given(halting_probabilities(), threshold)
def test_n_steps_lies_between_one_and_the_number_of_steps(p, thr):
    _, n_steps, _ = halting(p, thr)
    assert n_steps.dtype == torch.int64
    assert bool(((n_steps >= 1) & (n_steps <= p.shape[0])).all())


@given(halting_probabilities(), threshold)
def test_cumulative_probability_stays_below_threshold_before_n_steps_and_reaches_it_there(p, thr):
    _, n_steps, _ = halting(p, thr)
    cumulative = p.cumsum(0)
    before = steps_column(p) < n_steps
    assert bool((cumulative[before] < thr).all())
    at_halt = cumulative.gather(0, (n_steps - 1)[None])[0]
    assert bool(((at_halt >= thr) | (n_steps == p.shape[0])).all())


@given(halting_probabilities(), threshold)
def test_weights_are_p_before_n_steps_the_remainder_at_n_steps_and_zero_after(p, thr):
    weights, n_steps, remainder = halting(p, thr)
    step = steps_column(p)
    before, after = step < n_steps, step > n_steps
    assert torch.equal(weights[before], p[before])
    assert bool((weights[after] == 0).all())
    assert torch.equal(weights.gather(0, (n_steps - 1)[None])[0], remainder)
    torch.testing.assert_close(remainder, 1 - (p * before).sum(0), rtol=0, atol=0)


@given(halting_probabilities(), threshold)
def test_remainder_is_positive_below_a_threshold_of_one(p, thr):
    _, _, remainder = halting(p, thr)
    assert bool((remainder >= 1 - thr).all())
    assert bool((remainder <= 1).all())


@given(halting_probabilities(), threshold, st.integers(1, 8))
def test_token_whose_first_probability_reaches_threshold_halts_at_step_one_with_first_state(
        p, thr, d):
    p = p.clone()
    p[0] = thr
    states = torch.randn(p.shape[0], p.shape[1], d, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(d))
    weights, n_steps, remainder = halting(p, thr)
    assert bool((n_steps == 1).all())
    assert bool((remainder == 1).all())
    assert torch.equal((weights[..., None] * states).sum(0), states[0])


@given(halting_probabilities(), threshold, threshold)
def test_lowering_the_threshold_never_increases_n_steps(p, thr_a, thr_b):
    low, high = sorted((thr_a, thr_b))
    assert bool((halting(p, low)[1] <= halting(p, high)[1]).all())


def test_tokens_that_never_reach_the_threshold_halt_at_the_cap_with_weights_summing_to_one():
    p = torch.tensor([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]], dtype=torch.float64)
    weights, n_steps, remainder = halting(p, 0.99)
    assert n_steps.tolist() == [3, 3]
    torch.testing.assert_close(remainder, torch.tensor([0.7, 1.0], dtype=torch.float64))
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64))
    torch.testing.assert_close(weights.sum(0), torch.ones(2, dtype=torch.float64))


@given(halting_probabilities(), threshold)
def test_ponder_cost_gradient_is_minus_one_before_n_steps_and_zero_from_n_steps_on(p, thr):
    p = p.clone().requires_grad_(True)
    _, n_steps, remainder = halting(p, thr)
    (n_steps + remainder).sum().backward()
    expected = -(steps_column(p) < n_steps).to(p.dtype)
    assert torch.equal(p.grad, expected)


@given(halting_probabilities(), threshold)
def test_weight_gradient_is_one_on_its_own_p_before_n_steps(p, thr):
    # d w_k / d p_k = 1 for k < N; the remainder w_N = 1 - sum_{k<N} p_k gives -1 on those p.
    p = p.clone().requires_grad_(True)
    weights, n_steps, _ = halting(p, thr)
    before = (steps_column(p) < n_steps).to(p.dtype)
    (weights * before).sum().backward()
    assert torch.equal(p.grad, before)


@given(halting_probabilities(), threshold)
def test_halting_is_batched_over_any_trailing_shape(p, thr):
    flat = halting(p, thr)
    shaped = halting(p.view(p.shape[0], 1, p.shape[1], 1), thr)
    for a, b in zip(flat, shaped, strict=True):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0.5], [float("nan")]]), "NaN"),
    (torch.tensor([[0.5], [1.5]]), r"\[0, 1\]"),
    (torch.tensor([[-0.1], [0.5]]), r"\[0, 1\]"),
    (torch.tensor(0.5), "shape"),
    (torch.zeros(0, 3), "shape"),
    (torch.tensor([[1], [0]]), "floating-point"),
])
def test_invalid_halting_probabilities_raise_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        halting(bad, 0.9)


@pytest.mark.parametrize("thr", [0.0, -0.5, 1.01, float("nan"), True, "0.9"])
def test_threshold_outside_zero_one_raises_a_clear_error(thr):
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
        halting(torch.full((2, 3), 0.5), thr)


# ---------------------------------------------------------------------------------------------
# ACTLanguageModel
# ---------------------------------------------------------------------------------------------


def act_model(threshold: float = 0.9, cfg: ModelConfig = CFG, ponder_weight: float = 0.01,
              seed: int = 0) -> ACTLanguageModel:
    """A float64 model whose halting units vary per token, so tokens halt at different layers."""
    model = float64_model(seed, ACTLanguageModel, cfg, act_threshold=threshold,
                          act_lambda=ponder_weight)
    with torch.no_grad():
        for unit in model.halting_units:
            unit.weight.normal_(0, 0.5)
            unit.bias.uniform_(-1, 1)
    return model


MODEL = act_model()


def masked_dense_reference(model: ACTLanguageModel, idx: torch.Tensor):
    """Every layer for every token, potentials of halted tokens masked to 0, then halting()."""
    b, n = idx.shape
    x = model.embed(idx)
    cumulative = x.new_zeros(b, n)
    states, probs = [], []
    for layer, block in enumerate(model.blocks):
        running = (cumulative < model.act_threshold).to(x.dtype)
        h = block.norm(x)
        f, _ = block.moe(h.reshape(b * n, -1))
        v = block.potential(h) * running[..., None]
        x = x + f.view_as(x) + block.mix(block.resolvent(v))
        states.append(x)
        if layer < len(model.blocks) - 1:
            p = torch.sigmoid(model.halting_units[layer](x)).squeeze(-1)
        else:
            p = torch.ones_like(cumulative)  # the cap: every running token halts here
        probs.append(p)
        cumulative = cumulative + p
    weights, n_steps, remainder = halting(torch.stack(probs), model.act_threshold)
    output = (weights[..., None] * torch.stack(states)).sum(0)
    return model.head(model.norm(output)), n_steps, remainder, states, probs


model_threshold = st.sampled_from([0.3, 0.5, 0.8, 0.9, 0.99, 1.0])


@given(token_batches(), model_threshold)
def test_gathered_model_equals_the_masked_dense_reference_in_float64(idx, thr):
    MODEL.act_threshold = thr
    with torch.no_grad():
        out = MODEL(idx)
        logits, n_steps, remainder, _, _ = masked_dense_reference(MODEL, idx)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.stats["layers_per_token"], n_steps.to(torch.float64))
    torch.testing.assert_close(out.stats["ponder_cost"], n_steps + remainder, rtol=0, atol=1e-12)


@given(token_batches(), model_threshold)
def test_loss_is_cross_entropy_plus_lambda_times_mean_ponder_cost(idx, thr):
    model = act_model(thr, replace(CFG, balance_weight=0.0), ponder_weight=0.3)
    targets = idx.roll(1, dims=1)
    with torch.no_grad():
        out = model(idx, targets)
        logits, n_steps, remainder, _, _ = masked_dense_reference(model, idx)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(out.ce, ce, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, ce + 0.3 * (n_steps + remainder).mean(),
                               rtol=1e-10, atol=1e-10)


@given(token_batches(min_batch=2), model_threshold)
def test_a_sequence_result_does_not_depend_on_the_other_sequences_in_its_batch(idx, thr):
    MODEL.act_threshold = thr
    with torch.no_grad():
        together = MODEL(idx)
        for i in range(idx.shape[0]):
            alone = MODEL(idx[i:i + 1])
            torch.testing.assert_close(together.logits[i:i + 1], alone.logits,
                                       rtol=1e-12, atol=1e-12)
            assert torch.equal(together.stats["layers_per_token"][i:i + 1],
                               alone.stats["layers_per_token"])


@given(token_batches(min_len=2), model_threshold, st.data())
def test_perturbing_later_tokens_leaves_earlier_logits_unchanged(idx, thr, data):
    MODEL.act_threshold = thr
    cut = data.draw(st.integers(1, idx.shape[1] - 1))
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 1 + data.draw(st.integers(0, 10))) % CFG.vocab_size
    with torch.no_grad():
        a, b = MODEL(idx), MODEL(changed)
    torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut], rtol=1e-12, atol=1e-12)
    assert torch.equal(a.stats["layers_per_token"][:, :cut], b.stats["layers_per_token"][:, :cut])


@given(token_batches(), model_threshold)
def test_work_counted_equals_the_sum_of_layers_per_token(idx, thr):
    MODEL.act_threshold = thr
    with torch.no_grad():
        out = MODEL(idx)
    layers = out.stats["layers_per_token"]
    assert bool((layers == layers.round()).all()) and bool((layers >= 1).all())
    assert out.work.token_layers == int(layers.sum())
    assert out.work.expert_calls == int(layers.sum())
    depth = int(layers.max())  # layers in which some token ran: the recurrence runs there only
    assert out.work.positions == idx.numel() * depth


@given(token_batches(), model_threshold)
def test_halted_tokens_never_enter_later_per_token_work(idx, thr):
    MODEL.act_threshold = thr
    rows: dict[str, list[int]] = {}

    def record(name):
        return lambda module, args, output: rows.setdefault(name, []).append(args[0].shape[0])

    modules = {}
    for layer, block in enumerate(MODEL.blocks):
        modules[f"norm{layer}"] = block.norm
        modules[f"readout{layer}"] = block.readout
        modules[f"expert{layer}"] = block.moe  # the rows its experts run on (grouped)
    for layer, unit in enumerate(MODEL.halting_units):
        modules[f"halt{layer}"] = unit
    handles = []
    for name, module in modules.items():
        for m in (module if isinstance(module, torch.nn.ModuleList) else [module]):
            handles.append(m.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            out = MODEL(idx)
    finally:
        for h in handles:
            h.remove()
    layers = out.stats["layers_per_token"]
    for layer in range(CFG.n_layers):
        running = int((layers > layer).sum())
        for kind in ("norm", "readout", "expert", "halt"):
            if kind == "halt" and layer == CFG.n_layers - 1:
                continue
            assert sum(rows.get(f"{kind}{layer}", [])) == running, (kind, layer)


def test_tokens_halting_at_the_first_layer_give_the_one_block_model_and_skip_later_layers():
    model = act_model(0.9)
    with torch.no_grad():
        for unit in model.halting_units:
            unit.bias.fill_(50.0)  # p = 1 after every layer
        idx = random_tokens(1, 2, 7)
        out = model(idx)
        x, _ = model.blocks[0](model.embed(idx))
        expected = model.head(model.norm(x))
    torch.testing.assert_close(out.logits, expected, rtol=1e-12, atol=1e-12)
    assert bool((out.stats["layers_per_token"] == 1).all())
    assert out.work.positions == idx.numel()


MIXED = torch.tensor([[3, 9, 4, 0, 12, 7, 1], [5, 5, 16, 2, 8, 11, 3]])


def test_the_fixed_examples_halt_tokens_of_one_position_at_different_layers():
    # What the decoding example below relies on: at some position one row halts while another
    # runs on, and every depth occurs.
    MODEL.act_threshold = 0.8
    with torch.no_grad():
        layers = MODEL(MIXED).stats["layers_per_token"]
    assert bool((layers[0] != layers[1]).any())
    assert set(layers.flatten().tolist()) == {1.0, 2.0, 3.0}


@given(token_batches(), model_threshold)
@example(MIXED, 0.8)
def test_decode_steps_match_the_full_forward_pass(idx, thr):
    MODEL.act_threshold = thr
    with torch.no_grad():
        full = MODEL(idx).logits
    torch.testing.assert_close(decode(MODEL, idx)[0], full, rtol=1e-10, atol=1e-10)


@given(token_batches(), model_threshold)
@example(MIXED, 0.8)
def test_ponder_cost_gradient_is_minus_one_through_each_p_before_n_in_float64(idx, thr):
    # Eq. 13: d(N + R)/dp_n = -1 for n < N, 0 from N on; the chain rule through
    # p_n = sigmoid(w . x_n + b) gives the gradient of act_lambda * mean(N + R) on unit n.
    model = act_model(thr, ponder_weight=0.3)
    units = [p for unit in model.halting_units for p in (unit.weight, unit.bias)]
    ponder = model(idx).aux["ponder"]
    # Every token halting at layer 1 leaves N + R constant: no graph, a zero gradient.
    got = (torch.autograd.grad(ponder, units, materialize_grads=True) if ponder.requires_grad
           else [torch.zeros_like(u) for u in units])
    with torch.no_grad():
        _, n_steps, _, states, probs = masked_dense_reference(model, idx)
    for unit in range(CFG.n_layers - 1):
        p, x = probs[unit], states[unit]
        before = (unit + 1 < n_steps).to(p.dtype)
        factor = -0.3 / idx.numel() * before * p * (1 - p)  # -1 * dp/dz where n < N
        torch.testing.assert_close(got[2 * unit], (factor[..., None] * x).sum((0, 1))[None],
                                   rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got[2 * unit + 1], factor.sum()[None], rtol=1e-10, atol=1e-14)


def test_ponder_gradient_reaches_the_halting_units_and_matches_finite_differences():
    model = act_model(0.9, ponder_weight=0.5).train()
    idx = random_tokens(3, 2, 6)
    names = [n for n, _ in model.named_parameters() if n.startswith("halting_units")]
    params = dict(model.named_parameters())

    def loss(*tensors):
        return functional_call(model, dict(zip(names, tensors, strict=True)), (idx, idx)).loss

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-7, atol=1e-6)
    grads = torch.autograd.grad(loss(*inputs), inputs)
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_dense_weights_load_with_only_the_halting_units_missing():
    dense = LanguageModel(CFG)
    model = ACTLanguageModel(CFG)
    result = model.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        f"halting_units.{i}.{p}" for i in range(CFG.n_layers - 1) for p in ("weight", "bias"))


def test_fresh_model_halts_every_token_after_two_layers_at_the_default_threshold():
    model = ACTLanguageModel(CFG).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 5, dtype=torch.int64))
    assert bool((out.stats["layers_per_token"] == 2).all())


def test_registered_technique_builds_the_act_model_from_its_knobs():
    technique = get("act")
    assert technique.model is ACTLanguageModel
    knobs = {k.name: k for k in technique.knobs}
    assert knobs["act_threshold"].grid == (0.5, 0.8, 0.9, 0.95, 0.99)
    assert knobs["act_lambda"].grid == (0.001, 0.005, 0.01, 0.05, 0.1)
    assert technique.defaults() == {"act_threshold": 0.99, "act_lambda": 0.07}
    model = technique.make(CFG, {"act_threshold": "0.8", "act_lambda": 0.05})
    assert isinstance(model, ACTLanguageModel)
    assert model.knob_values() == {"act_threshold": 0.8, "act_lambda": 0.05}
    assert model.cfg == CFG


@pytest.mark.parametrize("kwargs, message", [
    ({"act_threshold": 0.0}, r"knob act_threshold: expected a number in \(0, 1\]"),
    ({"act_threshold": 1.5}, "knob act_threshold"),
    ({"act_threshold": math.nan}, "knob act_threshold"),
    ({"act_threshold": "high"}, "knob act_threshold"),
    ({"act_lambda": -0.1}, "knob act_lambda"),
    ({"act_lambda": math.nan}, "knob act_lambda"),
    ({"act_lambda": True}, "knob act_lambda"),
])
def test_invalid_knobs_raise_an_error_naming_the_knob(kwargs, message):
    with pytest.raises(KnobError, match=message):
        ACTLanguageModel(CFG, **kwargs)
    with pytest.raises(KnobError, match=message):
        ACTLanguageModel.from_knobs(CFG, kwargs)


# ---------------------------------------------------------------------------------------------
# Forcing (the ceiling)
# ---------------------------------------------------------------------------------------------


def failing_hooks(modules):
    def fail(module, args):
        raise AssertionError(f"{type(module).__name__} ran in a forced model")

    return [m.register_forward_pre_hook(fail) for m in modules]


@given(token_batches(), st.floats(0.05, 1.0), st.sampled_from(["uniform", "per_token"]),
       st.integers(0, 3))
def test_a_forced_model_runs_the_given_depths_without_halting_units(idx, keep, pattern, seed):
    forcing = Forcing(keep, pattern, seed)
    forced = MODEL.forced(forcing)
    handles = failing_hooks(MODEL.halting_units)
    try:
        with torch.no_grad():
            out = forced(idx)
    finally:
        for h in handles:
            h.remove()
    depths = forced_depths(forcing, CFG.n_layers, idx.numel()).view(idx.shape)
    assert torch.equal(out.stats["layers_per_token"], depths.to(torch.float64))
    assert torch.equal(out.stats["ponder_cost"], depths + 1.0)  # R = 1: p = 0 before the depth
    assert out.work.token_layers == out.work.expert_calls == int(depths.sum())
    assert out.work.positions == idx.numel() * int(depths.max())
    assert MODEL.forcing is None and MODEL.DECODES  # the forced copy leaves the model alone


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_forced_depth_equals_units_that_halt_every_token_at_that_depth(depth):
    # Halting probabilities ~0 before the depth and ~1 at it put the halting weight (to 1e-26)
    # on the state after that layer: what the forced model outputs.
    model = act_model(0.99)
    idx = random_tokens(4, 2, 7)
    with torch.no_grad():
        for layer, unit in enumerate(model.halting_units):
            unit.weight.zero_()
            unit.bias.fill_(60.0 if layer + 1 == depth else -60.0)
        learned = model(idx)
        forced = model.forced(Forcing(depth / CFG.n_layers))(idx)
    assert bool((learned.stats["layers_per_token"] == depth).all())
    torch.testing.assert_close(forced.logits, learned.logits, rtol=1e-12, atol=1e-12)
    assert forced.work == learned.work


def test_a_forced_model_does_not_decode():
    forced = MODEL.forced(Forcing(0.5))
    with pytest.raises(NotImplementedError, match="forced"):
        forced.init_state(2)
    with pytest.raises(NotImplementedError, match="forced"):
        forced.step(torch.zeros(2, dtype=torch.int64), MODEL.init_state(2))


@given(st.floats(0.01, 1.0), st.integers(1, 8), seeds)
def test_forced_depths_are_whole_layers_at_the_requested_mean_rate(keep, layers, seed):
    uniform = forced_depths(Forcing(keep), layers, 5)
    depth = int(uniform[0])
    assert bool((uniform == depth).all()) and 1 <= depth <= layers
    # the nearest whole depth (a tie, as 0.3 x 5 = 1.5, may go either way; 1e-9: rounding)
    assert depth == 1 or abs(depth - keep * layers) <= 0.5 + 1e-9
    tokens = 20_000
    drawn = forced_depths(Forcing(keep, "per_token", seed), layers, tokens)
    assert drawn.dtype == torch.int64 and bool(((drawn >= 1) & (drawn <= layers)).all())
    spread = 4 * math.sqrt(max(layers - 1, 1) / 4 / tokens)  # 4 sigma of a binomial mean
    assert abs(float(drawn.double().mean()) - max(1.0, keep * layers)) <= spread
    assert torch.equal(drawn, forced_depths(Forcing(keep, "per_token", seed), layers, tokens))
