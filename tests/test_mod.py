"""Mixture-of-Depths capacity routing (bk/adaptive/depth.py) against float64 oracles."""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from bench.registry import get
from bk.adaptive.depth import CapacityDepthModel, CapacityState, straight_through
from bk.model import DecodeState, LanguageModel
from bk.technique import Forcing, KnobError
from tests.strategies import TINY_4_LAYERS, decode, random_tokens, seeds, token_batches

CFG = replace(TINY_4_LAYERS, n_seq=6)  # so that short sequences span several capacity windows
F64 = torch.float64

batches = token_batches(max_len=15)  # up to two full windows and a partial one
capacities = st.sampled_from([0.01, 0.2, 0.5, 0.7, 1.0])
routings = st.sampled_from(["alternate", "inner"])


def mod_model(seed: int, capacity: float = 0.5, routed: str = "alternate",
              router_loss_weight: float = 0.1) -> CapacityDepthModel:
    """A float64 model whose routers select some tokens and not others."""
    torch.manual_seed(seed)
    model = CapacityDepthModel(CFG, capacity=capacity, routed=routed,
                               router_loss_weight=router_loss_weight)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.normal_(0.0, 0.5)
            router.bias.uniform_(-0.5, 0.5)
    return model.double().eval()


def first_k_in_windows(select: torch.Tensor, window: int, k: int) -> torch.Tensor:
    """The first ``k`` selected positions of every window of ``window`` positions, by a loop."""
    ran = torch.zeros_like(select)
    for row in range(select.shape[0]):
        taken = 0
        for i in range(select.shape[1]):
            if i % window == 0:
                taken = 0
            if select[row, i] and taken < k:
                ran[row, i] = True
                taken += 1
    return ran


def window_and_k(model: CapacityDepthModel, n: int, keep: float | None = None) -> tuple[int, int]:
    keep = model.capacity if keep is None else keep
    window = min(n, CFG.n_seq)
    return window, min(max(1, math.floor(keep * CFG.n_seq)), window)


def masked_dense_reference(model: CapacityDepthModel, idx: torch.Tensor):
    """Every token computes every block; in a routed layer the update of a token that is not
    among the first k selected of its window is dropped and its potential is 0.
    Returns (logits, layers per token, router scores per routed layer)."""
    b, n = idx.shape
    window, k = window_and_k(model, n)
    x = model.embed(idx)
    layers = torch.zeros(b, n, dtype=F64)
    scores = []
    for layer, block in enumerate(model.blocks):
        if str(layer) not in model.routers:
            x = block(x)[0]
            layers += 1
            continue
        s = model.routers[str(layer)](x).squeeze(-1)
        scores.append(s)
        ran = first_k_in_windows(s > 0, window, k)
        h = block.norm(x)
        f = block.moe(h.reshape(b * n, -1))[0].view_as(x)
        v = torch.where(ran[..., None], block.potential(h), 0.0)
        gate = 1 + (torch.sigmoid(s) - torch.sigmoid(s).detach())
        update = gate[..., None] * (f + block.mix(block.resolvent(v)))
        x = x + torch.where(ran[..., None], update, 0.0)
        layers += ran
    return model.head(model.norm(x)), layers, scores


@given(seeds, batches, capacities, routings)
def test_forward_equals_the_masked_dense_reference_in_value_and_gradient(seed, idx, capacity,
                                                                         routed):
    model = mod_model(seed, capacity, routed)
    out = model(idx)
    logits, layers, _ = masked_dense_reference(model, idx)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.stats["layers_per_token"], layers)
    w = torch.randn(logits.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    params = list(model.parameters())
    got = torch.autograd.grad((out.logits * w).sum(), params, materialize_grads=True)
    want = torch.autograd.grad((logits * w).sum(), params, materialize_grads=True)
    for name, a, e in zip([n for n, _ in model.named_parameters()], got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=name)


@given(seeds, batches, capacities, routings)
def test_at_most_k_tokens_of_each_window_run_a_routed_layer_and_work_counts_the_rows(
        seed, idx, capacity, routed):
    model = mod_model(seed, capacity, routed)
    with torch.no_grad():
        out = model(idx)
    b, n = idx.shape
    window, k = window_and_k(model, n)
    routed_count = len(model.routers)
    ran = out.stats["layers_per_token"] - (CFG.n_layers - routed_count)  # routed layers run
    assert bool((ran >= 0).all()) and bool((ran <= routed_count).all())
    for start in range(0, n, window):
        assert bool((ran[:, start:start + window].sum(1) <= routed_count * k).all())
    windows = -(-n // window)
    rows = (CFG.n_layers - routed_count) * b * n + routed_count * b * windows * k
    assert out.work.token_layers == out.work.expert_calls == rows  # padding rows run too
    assert out.work.positions == (CFG.n_layers - routed_count) * b * n \
        + routed_count * b * windows * window


@given(seeds, token_batches(max_len=14), capacities, routings)
def test_step_by_step_decoding_matches_the_forward_pass(seed, idx, capacity, routed):
    model = mod_model(seed, capacity, routed)
    with torch.no_grad():
        full = model(idx).logits
    logits, states = decode(model, idx)
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)
    state = states[-1]
    assert isinstance(state, CapacityState) and state.ran.shape == (len(model.routers),
                                                                    idx.shape[0])


@given(seeds, batches, capacities, routings, st.data())
def test_logits_and_decisions_at_a_position_do_not_depend_on_later_tokens(
        seed, idx, capacity, routed, data):
    model = mod_model(seed, capacity, routed)
    cut = data.draw(st.integers(1, idx.shape[1]))
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 1 + data.draw(st.integers(0, 10))) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
        prefix = model(idx[:, :cut])  # nor on how long the sequence is
    for other in (b, prefix):
        torch.testing.assert_close(other.logits[:, :cut], a.logits[:, :cut], rtol=1e-12,
                                   atol=1e-12)
        assert torch.equal(other.stats["layers_per_token"][:, :cut],
                           a.stats["layers_per_token"][:, :cut])


@given(seeds, token_batches(max_batch=4, max_len=15), capacities)
def test_a_sequence_result_does_not_depend_on_the_others_in_its_batch(seed, idx, capacity):
    model = mod_model(seed, capacity)
    with torch.no_grad():
        batch = model(idx)
        for row in range(idx.shape[0]):
            alone = model(idx[row:row + 1])
            torch.testing.assert_close(alone.logits[0], batch.logits[row], rtol=1e-12,
                                       atol=1e-12)
            assert torch.equal(alone.stats["layers_per_token"][0],
                               batch.stats["layers_per_token"][row])


def test_every_token_selected_at_capacity_one_is_the_dense_model():
    # The gate is 1 in value: a token that runs computes exactly the dense block.
    model = mod_model(0, capacity=1.0, routed="inner")
    with torch.no_grad():
        for router in model.routers.values():
            router.bias.fill_(50.0)
        idx = random_tokens(1, 2, 9)
        dense = LanguageModel(CFG).double().eval()
        dense.load_state_dict(model.state_dict(), strict=False)
        out = model(idx)
        torch.testing.assert_close(out.logits, dense(idx).logits, rtol=1e-12, atol=1e-12)
    assert bool((out.stats["layers_per_token"] == CFG.n_layers).all())


@given(st.floats(-30.0, 30.0))
def test_the_straight_through_gate_is_one_with_the_gradient_of_the_sigmoid(value):
    score = torch.tensor(value, dtype=F64, requires_grad=True)
    gate = straight_through(score)
    assert gate.item() == 1.0
    (grad,) = torch.autograd.grad(gate, score)
    torch.testing.assert_close(grad, torch.sigmoid(score) * (1 - torch.sigmoid(score)),
                               rtol=1e-12, atol=0)


@given(seeds, batches, capacities, routings)
def test_the_router_loss_is_the_cross_entropy_towards_the_top_k_of_each_window(
        seed, idx, capacity, routed):
    model = mod_model(seed, capacity, routed, router_loss_weight=0.3)
    with torch.no_grad():
        out = model.train()(idx, idx)
        _, _, scores = masked_dense_reference(model, idx)
    window, k = window_and_k(model, idx.shape[1])
    losses = []
    for s in scores:
        targets = torch.zeros_like(s)
        for row in range(s.shape[0]):
            for start in range(0, s.shape[1], window):
                part = s[row, start:start + window]
                top = sorted(range(part.numel()), key=lambda i: -float(part[i]))[:k]
                targets[row, [start + i for i in top]] = 1.0
        losses.append(F.binary_cross_entropy_with_logits(s, targets))
    torch.testing.assert_close(out.aux["router"], 0.3 * torch.stack(losses).mean(),
                               rtol=1e-10, atol=1e-12)
    assert set(out.aux) == {"balance", "router"}
    with torch.no_grad():
        assert model.eval()(idx, idx).aux == {}  # training terms only


def test_the_task_loss_trains_the_routers_through_the_tokens_that_ran():
    model = mod_model(5)
    idx = random_tokens(5, 2, 6)
    model(idx, idx).ce.backward()
    for router in model.routers.values():
        assert bool(router.weight.grad.abs().sum() > 0)


# ---------------------------------------------------------------------------------------------
# Forcing (the ceiling)
# ---------------------------------------------------------------------------------------------


def strided(n: int, keep: float) -> torch.Tensor:
    """``k = max(1, floor(keep n_seq))`` evenly strided positions of every ``n_seq`` window."""
    rate = max(1, math.floor(keep * CFG.n_seq)) / CFG.n_seq
    j = torch.arange(n) % CFG.n_seq
    return torch.tensor([math.floor((i + 1) * rate) > math.floor(i * rate) for i in j.tolist()])


@given(seeds, batches, st.floats(0.05, 1.0), routings)
def test_a_forced_uniform_model_runs_evenly_strided_positions_without_routers(seed, idx, keep,
                                                                             routed):
    model = mod_model(seed, 0.5, routed)
    handles = [r.register_forward_pre_hook(lambda *_: pytest.fail("a router ran"))
               for r in model.routers.values()]
    try:
        with torch.no_grad():
            out = model.forced(Forcing(keep, "uniform"))(idx)
    finally:
        for h in handles:
            h.remove()
    b, n = idx.shape
    window, k = window_and_k(model, n, keep)
    ran = first_k_in_windows(strided(n, keep).expand(b, n), window, k)
    unrouted = CFG.n_layers - len(model.routers)
    assert torch.equal(out.stats["layers_per_token"], unrouted + len(model.routers) * ran.to(F64))
    windows = -(-n // window)
    assert out.work.token_layers == unrouted * b * n + len(model.routers) * b * windows * k
    if n == CFG.n_seq:  # a full window: exactly k strided positions, the work rate is k / n_seq
        assert int(ran[0].sum()) == k
    assert model.forcing is None and model.DECODES  # the forced copy leaves the model alone


@given(seeds, st.floats(0.05, 1.0))
def test_a_forced_per_token_model_selects_at_random_at_the_rate_and_the_capacity_applies(seed,
                                                                                        keep):
    model = mod_model(seed)
    idx = torch.zeros(400, CFG.n_seq, dtype=torch.int64)
    forced = model.forced(Forcing(keep, "per_token", seed))
    with torch.no_grad():
        out = forced(idx)
        again = forced(idx)
    window, k = window_and_k(model, CFG.n_seq, keep)
    ran = out.stats["layers_per_token"] - (CFG.n_layers - len(model.routers))
    assert bool((ran.sum(1) <= len(model.routers) * k).all())
    # Selected with probability keep, then capped at k: the mean is that of min(Bin(n, keep), k).
    binomial = torch.distributions.Binomial(CFG.n_seq, torch.tensor(keep, dtype=F64))
    counts = torch.arange(CFG.n_seq + 1, dtype=F64)
    expected = (binomial.log_prob(counts).exp() * counts.clamp(max=k)).sum()
    mean = ran.sum(1).mean() / len(model.routers)
    assert abs(float(mean) - float(expected)) <= 4 * math.sqrt(CFG.n_seq / 4 / 800)
    assert torch.equal(out.logits, again.logits)  # seeded: the same pattern every call


def test_a_forced_model_equals_the_routed_one_when_the_routers_pick_the_same_positions():
    model = mod_model(1, capacity=0.5)
    idx = random_tokens(2, 3, 12)
    pattern = strided(12, 0.5)
    handles = [r.register_forward_hook(
        lambda module, args, out: torch.where(pattern, 1.0, -1.0).to(out).expand_as(out[..., 0])
        [..., None]) for r in model.routers.values()]
    try:
        with torch.no_grad():
            routed = model(idx)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        forced = model.forced(Forcing(0.5))(idx)
    # Equal up to the order of float64 sums: the routed path multiplies its update by a gate of
    # value 1, the forced one adds it unscaled.
    torch.testing.assert_close(forced.logits, routed.logits, rtol=1e-12, atol=1e-12)
    assert forced.work == routed.work
    assert torch.equal(forced.stats["layers_per_token"], routed.stats["layers_per_token"])


def test_a_forced_model_does_not_decode():
    forced = mod_model(0).forced(Forcing(0.5))
    with pytest.raises(NotImplementedError, match="forced"):
        forced.init_state(1)


# ---------------------------------------------------------------------------------------------
# Knobs, weights, registration, decode state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs, message", [
    ({"capacity": 0.0}, "knob capacity"),
    ({"capacity": 1.5}, "knob capacity"),
    ({"capacity": math.nan}, "knob capacity"),
    ({"capacity": "half"}, "knob capacity"),
    ({"routed": "every"}, "knob routed: expected one of 'alternate', 'inner'"),
    ({"router_loss_weight": -1.0}, "knob router_loss_weight"),
    ({"router_loss_weight": math.nan}, "knob router_loss_weight"),
])
def test_bad_knobs_are_rejected_with_an_error_naming_the_knob(knobs, message):
    with pytest.raises(KnobError, match=message):
        CapacityDepthModel(CFG, **knobs)
    with pytest.raises(KnobError, match=message):
        CapacityDepthModel.from_knobs(CFG, knobs)


@pytest.mark.parametrize("layers, routed", [(1, "alternate"), (2, "inner")])
def test_a_routing_that_routes_no_layer_of_the_config_is_rejected(layers, routed):
    cfg = replace(CFG, n_layers=layers)
    with pytest.raises(KnobError, match=f"knob routed: '{routed}' routes no layer"):
        CapacityDepthModel(cfg, routed=routed)


def test_routed_layers_never_include_the_first():
    cfg = replace(CFG, n_layers=8)
    assert sorted(CapacityDepthModel(cfg).routers) == ["1", "3", "5", "7"]
    assert sorted(CapacityDepthModel(cfg, routed="inner").routers) == [str(i) for i in range(1, 7)]


def test_dense_weights_load_leaving_only_the_routers_new():
    model = CapacityDepthModel(CFG)
    result = model.load_state_dict(LanguageModel(CFG).state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == [f"routers.{i}.{p}" for i in (1, 3)
                                           for p in ("bias", "weight")]


def test_the_technique_is_registered_with_its_knobs():
    technique = get("mod")
    assert technique.model is CapacityDepthModel
    assert technique.defaults() == {"capacity": 0.5, "routed": "alternate",
                                    "router_loss_weight": 0.1}
    model = technique.make(CFG, {"capacity": "0.25", "routed": "inner"})
    assert model.knob_values() == {"capacity": 0.25, "routed": "inner", "router_loss_weight": 0.1}


def test_step_needs_the_capacity_state():
    model = mod_model(0)
    with pytest.raises(TypeError, match="CapacityState"):
        model.step(torch.zeros(2, dtype=torch.int64), DecodeState((None,) * CFG.n_layers))
