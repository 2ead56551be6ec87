"""Properties of the conditional mixture of experts (per-token k chosen by a learned predictor)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.registry import get
from bk.adaptive.conditional_moe import ConditionalMoE, ConditionalMoELanguageModel
from bk.model import LanguageModel
from bk.moe import Expert
from bk.technique import Forcing, KnobError
from tests.strategies import TINY, decode, seeds

D_MODEL, D_HIDDEN = 8, 8


@st.composite
def moe_cases(draw, *, k_equal_experts: bool = False):
    n_experts = draw(st.integers(2, 4))
    if k_equal_experts:
        k_min = k_max = n_experts
    else:
        k_max = draw(st.integers(1, n_experts))
        k_min = draw(st.integers(0, k_max))
    tokens = draw(st.integers(1, 12))
    seed = draw(seeds)
    training = draw(st.booleans())
    torch.manual_seed(seed)
    moe = ConditionalMoE(D_MODEL, D_HIDDEN, n_experts, k_min=k_min, k_max=k_max)
    # A random difficulty predictor, so k varies across tokens.
    torch.nn.init.normal_(moe.difficulty.weight, std=2.0)
    moe.train(training)
    x = torch.randn(tokens, D_MODEL) * 2
    return moe, x


def dense_mixture_float64(moe: ConditionalMoE, x: torch.Tensor) -> torch.Tensor:
    """sum_e p_e E_e(x), everything in float64."""
    with torch.no_grad():
        ref = ConditionalMoE(D_MODEL, D_HIDDEN, moe.n_experts, k_min=moe.k_min,
                             k_max=moe.k_max).double()
        ref.load_state_dict(moe.state_dict())
        x = x.double()
        probs = torch.softmax(ref.router(x), dim=-1)
        return sum(probs[:, e, None] * expert(x) for e, expert in enumerate(ref.experts))


def masked_dense_float64(moe: ConditionalMoE, x: torch.Tensor, routing) -> torch.Tensor:
    """Every expert on every token, weighted by the routing's gates (0 in value on inactive
    slots, not in gradient: the straight-through path of an unchosen slot)."""
    outputs = torch.stack([expert(x) for expert in moe.experts], dim=1)  # (T, E, d)
    weights = torch.zeros(x.shape[0], moe.n_experts, dtype=x.dtype).scatter_add(
        1, routing.experts, routing.gates)
    return (weights[:, :, None] * outputs).sum(dim=1)


def count_expert_rows(module: torch.nn.Module) -> list[int]:
    """A one-element list that counts the rows every expert in ``module`` runs on."""
    rows = [0]

    def hook(expert, args):
        rows[0] += args[0].shape[0]

    for part in module.modules():
        if isinstance(part, Expert):
            part.register_forward_pre_hook(hook)
    return rows


@given(moe_cases())
def test_every_token_uses_between_k_min_and_k_max_experts(case):
    moe, x = case
    routing = moe.route(x)
    assert bool(((routing.k >= moe.k_min) & (routing.k <= moe.k_max)).all())
    assert torch.equal(routing.k, routing.active.sum(dim=-1))
    # Active slots are a prefix of the top-k: the k most probable experts.
    assert torch.equal(routing.active, torch.arange(moe.k_max)[None, :] < routing.k[:, None])


@given(moe_cases())
def test_in_eval_mode_k_is_the_difficulty_predictors_most_probable_value(case):
    moe, x = case
    moe.eval()
    with torch.no_grad():
        routing = moe.route(x)
        choice = moe.difficulty(x).argmax(dim=-1)
    assert torch.equal(routing.k, moe.k_min + choice)


@given(moe_cases())
def test_gate_weights_are_non_negative_and_sum_to_one_for_every_token_using_experts(case):
    moe, x = case
    routing = moe.route(x)
    assert bool((routing.gates >= 0).all())
    assert bool((routing.gates[~routing.active] == 0).all())
    # A token with k = 0 (possible when k_min = 0) uses no expert: all its gates are 0.
    torch.testing.assert_close(routing.gates.sum(dim=-1), (routing.k > 0).float())


@given(moe_cases())
def test_gates_are_router_probabilities_renormalised_over_the_chosen_experts(case):
    moe, x = case
    routing = moe.route(x)
    chosen = routing.probs.gather(1, routing.experts) * routing.active
    total = chosen.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(routing.gates, chosen / torch.where(total > 0, total, 1.0))


@given(moe_cases(k_equal_experts=True))
def test_using_every_expert_equals_the_dense_mixture(case):
    moe, x = case
    oracle = dense_mixture_float64(moe, x)
    out, _ = moe(x)
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-5)
    moe64 = moe.double()
    out64, _ = moe64(x.double())
    torch.testing.assert_close(out64, oracle, rtol=1e-12, atol=1e-12)


@given(moe_cases())
def test_sparse_dispatch_equals_the_dense_masked_computation(case):
    moe, x = case
    moe = moe.double()
    x = x.double()
    with torch.no_grad():
        routing = moe.route(x)
        sparse = moe.dispatch(x, routing)
        dense = masked_dense_float64(moe, x, routing)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


@given(moe_cases())
def test_in_training_every_slot_runs_and_in_evaluation_only_the_active_ones(case):
    moe, x = case
    routing = moe.route(x)
    expected = torch.ones_like(routing.active) if moe.training else routing.active
    assert torch.equal(routing.runs, expected)
    rows = count_expert_rows(moe)
    moe.dispatch(x, routing)
    assert rows[0] == int(routing.runs.sum())


@given(moe_cases())
def test_in_training_the_gradient_through_every_slot_equals_the_float64_mixture_of_all_slots(
        case):
    # The straight-through gradient of an inactive slot's mask needs its expert's output.
    moe, x = case
    moe = moe.double().train()
    x = x.double().requires_grad_()
    routing = moe.route(x)
    reference = masked_dense_float64(moe, x, routing)
    out = moe.dispatch(x, routing)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    direction = torch.randn_like(out)
    params = [x, moe.difficulty.weight, moe.difficulty.bias, moe.router.weight,
              *moe.experts.parameters()]
    got = torch.autograd.grad((out * direction).sum(), params, retain_graph=True,
                              allow_unused=True)
    want = torch.autograd.grad((reference * direction).sum(), params, allow_unused=True)
    for param, g, w in zip(params, got, want, strict=True):
        # An expert that no token ranks in its top k_max runs in neither: no gradient.
        zero = torch.zeros_like(param)
        torch.testing.assert_close(zero if g is None else g, zero if w is None else w,
                                   rtol=1e-10, atol=1e-12)


def test_a_token_that_chose_no_expert_still_hears_what_the_expert_would_have_given():
    # Every token picks k = 0 and the cost penalty is off: the only gradient the difficulty
    # predictor can get is the language-model term through the skipped expert. Without it
    # (experts run only for active slots in training) k = 0 is absorbing and k collapses.
    torch.manual_seed(0)
    moe = ConditionalMoE(D_MODEL, D_HIDDEN, 2, k_min=0, k_max=1, temperature=0.1).train()
    with torch.no_grad():
        moe.difficulty.bias.copy_(torch.tensor([8.0, -8.0]))
    x = torch.randn(16, D_MODEL)
    out, _ = moe(x)
    assert int(moe.last_routing.k.sum()) == 0 and not bool(out.any())
    (out * torch.randn_like(out)).sum().backward()
    assert float(moe.difficulty.weight.grad.abs().sum()) > 0


@given(moe_cases(), st.randoms(use_true_random=False))
def test_per_token_results_do_not_depend_on_token_order(case, rng):
    moe, x = case
    moe.eval()  # training draws Gumbel noise per position
    order = list(range(x.shape[0]))
    rng.shuffle(order)
    perm = torch.tensor(order)
    with torch.no_grad():
        out, _ = moe(x)
        out_perm, _ = moe(x[perm])
        k, k_perm = moe.route(x).k, moe.route(x[perm]).k
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-5, atol=1e-6)
    assert torch.equal(k_perm, k[perm])


@given(moe_cases())
def test_expert_load_counts_sum_to_the_total_of_k(case):
    moe, x = case
    routing = moe.route(x)
    load = routing.load(moe.n_experts)
    assert int(load.sum()) == int(routing.k.sum())
    # Each expert receives a token at most once (top-k experts are distinct).
    assert bool((load <= x.shape[0]).all())
    per_token = torch.zeros(x.shape[0], moe.n_experts, dtype=torch.int64)
    per_token.scatter_add_(1, routing.experts, routing.active.long())
    assert int(per_token.max()) <= 1


@given(moe_cases())
def test_balance_loss_is_a_differentiable_tensor_reaching_the_router(case):
    moe, x = case
    routing = moe.route(x)
    loss = moe.balance_loss(routing)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
    loss.backward()
    assert moe.router.weight.grad is not None
    assert torch.isfinite(moe.router.weight.grad).all()


@pytest.mark.parametrize("k_min", [0, 1])
@pytest.mark.parametrize("k_cost", [0.0, 0.05])
def test_gradient_reaches_the_difficulty_predictor(k_cost, k_min):
    torch.manual_seed(0)
    dense = LanguageModel(TINY)
    model = ConditionalMoELanguageModel(TINY, k_min=k_min, k_max=2, k_cost=k_cost)
    model.load_state_dict(dense.state_dict(), strict=False)
    model.train()
    x = torch.randint(0, TINY.vocab_size, (4, TINY.n_seq))
    y = torch.randint(0, TINY.vocab_size, (4, TINY.n_seq))
    model(x, y).loss.backward()
    for block in model.blocks:
        grad = block.moe.difficulty.weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0


def test_dense_weights_load_under_the_same_names_and_only_the_predictor_is_new():
    dense = LanguageModel(TINY)
    model = ConditionalMoELanguageModel(TINY)
    result = model.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(".moe.difficulty." in key for key in result.missing_keys)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


@given(seeds, st.booleans())
def test_reported_expert_calls_equal_the_expert_rows_that_ran(seed, training):
    torch.manual_seed(seed)
    model = ConditionalMoELanguageModel(TINY, k_min=1, k_max=2, k_cost=0.01)
    for block in model.blocks:
        torch.nn.init.normal_(block.moe.difficulty.weight, std=2.0)
    model.train(training)
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    y = torch.randint(0, TINY.vocab_size, (2, 8))
    rows = count_expert_rows(model)
    out = model(x, y)
    layers = TINY.n_layers
    per_token = out.stats["experts_per_token"]
    assert per_token.shape == x.shape
    assert x.numel() * layers <= round(float(per_token.sum()) * layers) <= 2 * x.numel() * layers
    assert out.work.token_layers == x.numel() * layers
    assert out.work.expert_calls == rows[0]
    if training:  # every slot runs; balance and cost terms are in the objective only
        assert out.work.expert_calls == 2 * x.numel() * layers
        assert float(out.loss.detach()) > float(out.ce.detach())
    else:
        assert out.work.expert_calls == round(float(per_token.sum()) * layers)
        assert torch.equal(out.loss, out.ce)


def test_invalid_k_bounds_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="k_min <= k_max <= n_experts"):
        ConditionalMoE(D_MODEL, D_HIDDEN, 2, k_min=1, k_max=3)
    with pytest.raises(ValueError, match="k_max >= 1"):
        ConditionalMoE(D_MODEL, D_HIDDEN, 2, k_min=0, k_max=0)
    with pytest.raises(ValueError, match="k_min <= k_max"):
        ConditionalMoE(D_MODEL, D_HIDDEN, 4, k_min=3, k_max=2)


@pytest.mark.parametrize("knobs, name", [
    ({"k_min": 0.5}, "k_min"), ({"k_max": 2.5}, "k_max"), ({"k_min": -1}, "k_min"),
    ({"k_max": 3}, "k_max"),  # more than TINY's 2 experts
    ({"k_min": 2, "k_max": 1}, "k_min"),
    ({"k_cost": -1.0}, "k_cost"), ({"k_cost": float("nan")}, "k_cost"),
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
])
def test_bad_knobs_are_rejected_naming_the_knob(knobs, name):
    with pytest.raises(KnobError, match=f"knob {name}"):
        ConditionalMoELanguageModel(TINY, **knobs)
    with pytest.raises(KnobError, match=f"knob {name}"):
        get("cond_moe").make(TINY, knobs)


def test_the_technique_declares_its_knobs_with_todays_defaults():
    technique = get("cond_moe")
    assert technique.defaults() == {"k_min": 1, "k_max": 2, "k_cost": 0.01, "temperature": 1.0}
    model = technique.make(TINY, {"k_min": "0", "k_cost": 0.05})
    assert isinstance(model, ConditionalMoELanguageModel)
    assert model.knob_values() == {"k_min": 0, "k_max": 2, "k_cost": 0.05, "temperature": 1.0}
    assert all(block.moe.k_min == 0 for block in model.blocks)


def test_an_empty_token_set_routes_nothing_and_costs_nothing():
    moe = ConditionalMoE(D_MODEL, D_HIDDEN, 3, k_min=1, k_max=2)
    moe.train()
    out, balance = moe(torch.empty(0, D_MODEL))
    assert out.shape == (0, D_MODEL) and float(balance) == 0.0


# -- exact values and gradients of the auxiliary terms -------------------------------------


def balance_float64(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    k: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e: f_e the share of (token, expert) assignments to e when token t uses
    its k_t most probable experts, P_e the mean router probability; by a plain loop."""
    probs = torch.softmax(x @ weight.T + bias, dim=-1)
    n_experts = probs.shape[1]
    load = [0] * n_experts
    for t in range(x.shape[0]):
        for e in probs[t].argsort(descending=True)[:int(k[t])].tolist():
            load[e] += 1
    share = torch.tensor(load, dtype=torch.float64) / max(1, sum(load))
    return n_experts * (share * probs.mean(dim=0)).sum()


def expected_k_float64(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       k_min: int) -> torch.Tensor:
    """Mean over tokens of E[k] = sum_j softmax(difficulty logits)_j (k_min + j)."""
    probs = torch.softmax(x @ weight.T + bias, dim=-1)
    values = torch.arange(k_min, k_min + probs.shape[1], dtype=torch.float64)
    return (probs * values).sum(dim=-1).mean()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


@given(moe_cases())
def test_balance_loss_and_its_gradient_equal_the_float64_reference(case):
    moe, x = case
    moe, x = moe.double(), x.double()
    routing = moe.route(x)
    loss = moe.balance_loss(routing)
    grads = torch.autograd.grad(loss, [moe.router.weight, moe.router.bias])
    weight, bias = leaf(moe.router.weight), leaf(moe.router.bias)
    reference = balance_float64(x, weight, bias, routing.k)
    expected = torch.autograd.grad(reference, [weight, bias])
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@given(moe_cases())
def test_expected_k_and_its_gradient_equal_the_float64_reference(case):
    moe, x = case
    moe, x = moe.double(), x.double()
    cost = moe.route(x).expected_k.mean()
    grads = torch.autograd.grad(cost, [moe.difficulty.weight, moe.difficulty.bias])
    weight, bias = leaf(moe.difficulty.weight), leaf(moe.difficulty.bias)
    reference = expected_k_float64(x, weight, bias, moe.k_min)
    expected = torch.autograd.grad(reference, [weight, bias])
    torch.testing.assert_close(cost, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def random_predictors(model: ConditionalMoELanguageModel, std: float = 2.0
                      ) -> ConditionalMoELanguageModel:
    """Random difficulty predictors, so that k varies from token to token."""
    with torch.no_grad():
        for block in model.blocks:
            block.moe.difficulty.weight.normal_(std=std)
            block.moe.difficulty.bias.normal_()
    return model


@given(seeds, st.sampled_from([(0, 2), (1, 2), (1, 1)]),
       st.sampled_from([0.0, 0.05]))
def test_the_models_auxiliary_terms_and_their_gradients_equal_the_float64_reference(
        seed, bounds, k_cost):
    # Layer-level references from each layer's MoE input: the last layer's router and predictor
    # reach the objective only through its own terms, so their gradients are checked exactly.
    k_min, k_max = bounds
    torch.manual_seed(seed)
    model = random_predictors(ConditionalMoELanguageModel(TINY, k_min=k_min, k_max=k_max,
                                                          k_cost=k_cost)).double().train()
    inputs = []
    for block in model.blocks:
        block.moe.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    out = model(x, x)
    routings = [block.moe.last_routing for block in model.blocks]
    layers = TINY.n_layers
    balance = sum(balance_float64(h.detach(), block.moe.router.weight.detach(),
                                  block.moe.router.bias.detach(), routing.k)
                  for h, block, routing in zip(inputs, model.blocks, routings, strict=True))
    cost = sum(expected_k_float64(h.detach(), block.moe.difficulty.weight.detach(),
                                  block.moe.difficulty.bias.detach(), k_min)
               for h, block in zip(inputs, model.blocks, strict=True))
    assert set(out.aux) == {"balance", "k_cost"}
    torch.testing.assert_close(out.aux["balance"], TINY.balance_weight * balance / layers,
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.aux["k_cost"], k_cost * cost / layers, rtol=1e-12,
                               atol=1e-15)
    last, h, routing = model.blocks[-1].moe, inputs[-1].detach(), routings[-1]
    got = torch.autograd.grad(out.aux["balance"], last.router.weight, retain_graph=True)[0]
    weight = leaf(last.router.weight)
    reference = TINY.balance_weight / layers * balance_float64(h, weight, last.router.bias,
                                                               routing.k)
    torch.testing.assert_close(got, torch.autograd.grad(reference, weight)[0], rtol=1e-10,
                               atol=1e-14)
    if k_cost and k_max > k_min:
        got = torch.autograd.grad(out.aux["k_cost"], last.difficulty.weight)[0]
        weight = leaf(last.difficulty.weight)
        reference = k_cost / layers * expected_k_float64(h, weight, last.difficulty.bias, k_min)
        torch.testing.assert_close(got, torch.autograd.grad(reference, weight)[0],
                                   rtol=1e-10, atol=1e-14)


def test_in_eval_mode_the_objective_has_no_auxiliary_terms():
    model = ConditionalMoELanguageModel(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    out = model(x, x)
    assert out.aux == {} and torch.equal(out.loss, out.ce)


# -- decoding ---------------------------------------------------------------------------------


@given(seeds, st.integers(1, 3), st.integers(1, TINY.n_seq),
       st.sampled_from([(0, 2), (1, 2)]))
def test_decoding_one_position_at_a_time_equals_the_forward_pass(seed, b, n, bounds):
    torch.manual_seed(seed)
    model = random_predictors(ConditionalMoELanguageModel(TINY, k_min=bounds[0],
                                                          k_max=bounds[1]))
    model = model.double().eval()
    x = torch.randint(0, TINY.vocab_size, (b, n))
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(decode(model, x)[0], full.logits, rtol=1e-10, atol=1e-10)


# -- forcing ----------------------------------------------------------------------------------


def failing_hook(module, args):
    raise AssertionError("the difficulty predictor ran in a forced model")


@pytest.mark.parametrize("keep, k", [(1.0, 2), (0.5, 1), (0.75, 2), (0.2, 0), (0.3, 1)])
def test_a_uniformly_forced_model_gives_every_token_the_same_k_without_the_predictor(keep, k):
    torch.manual_seed(0)
    model = random_predictors(ConditionalMoELanguageModel(TINY, k_min=1, k_max=2)).eval()
    forced = model.forced(Forcing(keep, "uniform"))
    for block in model.blocks:
        block.moe.difficulty.register_forward_pre_hook(failing_hook)
    rows = count_expert_rows(model)
    x = torch.randint(0, TINY.vocab_size, (2, TINY.n_seq))
    with torch.no_grad():
        out = forced(x)
    token_layers = x.numel() * TINY.n_layers
    assert out.work.expert_calls == rows[0] == k * token_layers
    assert bool((out.stats["experts_per_token"] == k).all())
    assert model.forcing is None  # forcing leaves the model itself alone


def test_a_per_token_forced_model_draws_k_per_token_at_the_requested_mean():
    torch.manual_seed(0)
    model = ConditionalMoELanguageModel(TINY, k_min=1, k_max=2).eval()
    for block in model.blocks:
        block.moe.difficulty.register_forward_pre_hook(failing_hook)
    rows = count_expert_rows(model)
    x = torch.randint(0, TINY.vocab_size, (8, TINY.n_seq))
    forced = model.forced(Forcing(0.5, "per_token", seed=3))
    with torch.no_grad():
        out, again = forced(x), forced(x)
    assert torch.equal(out.logits, again.logits)  # the draws are fixed per batch shape
    slots = x.numel() * TINY.n_layers * 2
    assert out.work.expert_calls == rows[0] // 2
    assert abs(out.work.expert_calls - 0.5 * slots) <= 4 * math.sqrt(slots * 0.25)
    per_token = out.stats["experts_per_token"] * TINY.n_layers
    assert len(per_token.unique()) > 2  # tokens differ in k
    assert out.work.expert_calls == round(float(per_token.sum()))


@settings(max_examples=5)
@given(seeds)
def test_forcing_the_learned_decision_reproduces_the_model(seed):
    # A predictor that always picks k_max, forced at keep = 1 (k = k_max): the same model.
    torch.manual_seed(seed)
    model = ConditionalMoELanguageModel(TINY, k_min=1, k_max=2).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.moe.difficulty.bias.copy_(torch.tensor([0.0, 5.0]))
    x = torch.randint(0, TINY.vocab_size, (2, TINY.n_seq))
    with torch.no_grad():
        learned, forced = model(x), model.forced(Forcing(1.0))(x)
    assert bool((learned.stats["experts_per_token"] == 2).all())
    torch.testing.assert_close(forced.logits, learned.logits, rtol=0, atol=0)
    assert forced.work == learned.work
    with pytest.raises(NotImplementedError, match="forced"):
        model.forced(Forcing(1.0)).init_state(2)
