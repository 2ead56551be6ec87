"""Properties of the conditional mixture of experts (per-token k chosen by a learned predictor)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.conditional_moe import ConditionalMoE, ConditionalMoELanguageModel
from bk.model import LanguageModel, ModelConfig

TINY = ModelConfig(vocab_size=17, d_model=16, n_layers=3, n_seq=16, n_experts=2, d_expert=16,
                   bk_channels=2)
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
    seed = draw(st.integers(0, 2**16))
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
    """Every expert on every token, combined with the routing's gates (0 where inactive)."""
    outputs = torch.stack([expert(x) for expert in moe.experts], dim=1)  # (T, E, d)
    weights = torch.zeros(x.shape[0], moe.n_experts, dtype=x.dtype)
    gates = torch.where(routing.active, routing.gates, 0.0)
    weights.scatter_add_(1, routing.experts, gates)
    return (weights[:, :, None] * outputs).sum(dim=1)


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


@given(st.integers(0, 2**16), st.booleans())
def test_reported_expert_calls_equal_the_experts_the_tokens_used(seed, training):
    torch.manual_seed(seed)
    model = ConditionalMoELanguageModel(TINY, k_min=1, k_max=2, k_cost=0.01)
    for block in model.blocks:
        torch.nn.init.normal_(block.moe.difficulty.weight, std=2.0)
    model.train(training)
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    y = torch.randint(0, TINY.vocab_size, (2, 8))
    out = model(x, y)
    layers = TINY.n_layers
    per_token = out.stats["experts_per_token"]
    assert per_token.shape == x.shape
    assert out.work.expert_calls == round(float(per_token.sum()) * layers)
    assert x.numel() * layers <= out.work.expert_calls <= 2 * x.numel() * layers
    assert out.work.token_layers == x.numel() * layers
    if training:  # balance and cost terms are in the training objective only
        assert float(out.loss.detach()) > float(out.ce.detach())
    else:
        assert torch.equal(out.loss, out.ce)


def test_invalid_k_bounds_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="k_min <= k_max <= n_experts"):
        ConditionalMoE(D_MODEL, D_HIDDEN, 2, k_min=1, k_max=3)
    with pytest.raises(ValueError, match="k_max >= 1"):
        ConditionalMoE(D_MODEL, D_HIDDEN, 2, k_min=0, k_max=0)
    with pytest.raises(ValueError, match="k_min <= k_max"):
        ConditionalMoE(D_MODEL, D_HIDDEN, 4, k_min=3, k_max=2)
    with pytest.raises(ValueError, match="k_cost"):
        ConditionalMoELanguageModel(TINY, k_cost=-1.0)


def test_an_empty_token_set_routes_nothing_and_costs_nothing():
    moe = ConditionalMoE(D_MODEL, D_HIDDEN, 3, k_min=1, k_max=2)
    moe.train()
    out, balance = moe(torch.empty(0, D_MODEL))
    assert out.shape == (0, D_MODEL) and float(balance) == 0.0
