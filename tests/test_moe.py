"""Properties of the top-1 MoE (bk.moe): dispatch, gate and balance-loss gradients by value.

The references are independent of the sorted, grouped dispatch: every expert runs on every
token in float64 and a one-hot mask picks the routed output ("masked dense").
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.model import LanguageModel, ModelConfig
from bk.moe import MoEFeedForward, Routing


def masked_dense(moe: MoEFeedForward, x: torch.Tensor, expert: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
    """sum_e [expert == e] gate E_e(x), every expert on every token, in x's dtype."""
    mask = torch.nn.functional.one_hot(expert, moe.n_experts).to(x.dtype)  # (T, E)
    outputs = torch.stack([e(x) for e in moe.experts], dim=1)  # (T, E, d)
    return (mask[..., None] * outputs).sum(dim=1) * gate[:, None]


def float64_copy(moe: MoEFeedForward) -> MoEFeedForward:
    ref = MoEFeedForward(moe.router.in_features, moe.experts[0].up.out_features,
                         moe.n_experts).double()
    ref.load_state_dict(moe.state_dict())  # exact: float32 and float64 values fit float64
    return ref


@st.composite
def routed_tokens(draw):
    """An MoE, tokens and an arbitrary routing: any expert per token (so some experts may get
    no token, or one expert all of them), any gate, any number of tokens including 0 and 1.
    Widths are multiples of 4 half of the time (the grouped-matmul path in float32)."""
    aligned = draw(st.booleans())
    width = st.sampled_from([4, 8, 12]) if aligned else st.integers(1, 9)
    d, hidden, n_experts = draw(width), draw(width), draw(st.integers(1, 5))
    tokens = draw(st.integers(0, 24))
    expert = draw(st.lists(st.integers(0, n_experts - 1), min_size=tokens, max_size=tokens))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    moe = MoEFeedForward(d, hidden, n_experts).to(dtype)
    with torch.no_grad():  # biases too, so a misplaced bias shows
        for p in moe.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(tokens, d, dtype=dtype)
    gate = torch.rand(tokens, dtype=dtype)
    return moe, x, torch.tensor(expert, dtype=torch.int64), gate


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@given(routed_tokens())
def test_dispatch_and_its_gradients_equal_the_float64_masked_dense_reference(case):
    moe, x, expert, gate = case
    x, gate = x.requires_grad_(), gate.requires_grad_()
    routing = Routing(expert=expert, gate=gate, probs=x.new_empty(0, 0))
    out = moe.dispatch(x, routing)
    with torch.no_grad():  # the kernels without their autograd functions: the same values
        torch.testing.assert_close(moe.dispatch(x, routing), out, rtol=0, atol=0)
        m = torch.randn_like(x)
        torch.testing.assert_close(moe.dispatch(x, routing, (x, m.clone())), x + out + m,
                                   rtol=0, atol=0)
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weights).sum().backward()

    ref = float64_copy(moe)
    x64 = x.detach().double().requires_grad_()
    gate64 = gate.detach().double().requires_grad_()
    expected = masked_dense(ref, x64, expert, gate64)
    (expected * weights).sum().backward()

    tol = tolerance(x.dtype)
    torch.testing.assert_close(out.double(), expected.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(gate.grad.double(), gate64.grad, **tol)
    for (name, p), p64 in zip(moe.named_parameters(), ref.parameters(), strict=True):
        if name.startswith("router"):
            continue  # dispatch does not read the router
        grad = torch.zeros_like(p64) if p.grad is None else p.grad.double()
        torch.testing.assert_close(grad, p64.grad, **tol, msg=name)


@given(routed_tokens(), st.sampled_from(["x", "gate"]))
def test_the_gradient_of_the_one_input_that_needs_one_equals_the_reference(case, needs):
    """With gradients on, the dispatch sorts without its kernel's gather when x or the gate
    needs a gradient; each alone takes that path too."""
    moe, x, expert, gate = case
    (x if needs == "x" else gate).requires_grad_()
    out = moe.dispatch(x, Routing(expert=expert, gate=gate, probs=x.new_empty(0, 0)))
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    x64, gate64 = x.detach().double(), gate.detach().double()
    (x64 if needs == "x" else gate64).requires_grad_()
    (masked_dense(float64_copy(moe), x64, expert, gate64) * weights).sum().backward()
    got, expected = (x.grad, x64.grad) if needs == "x" else (gate.grad, gate64.grad)
    torch.testing.assert_close(got.double(), expected, **tolerance(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("expert", [[], [2], [1, 1, 1, 1, 1], [0, 2, 0, 2, 2, 0]])
def test_dispatch_edge_cases_no_token_one_token_one_expert_empty_experts(dtype, expert):
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 4, 3).to(dtype)
    expert = torch.tensor(expert, dtype=torch.int64)
    x = torch.randn(len(expert), 8, dtype=dtype, requires_grad=True)
    gate = torch.rand(len(expert), dtype=dtype, requires_grad=True)
    out = moe.dispatch(x, Routing(expert=expert, gate=gate, probs=x.new_empty(0, 0)))
    out.sum().backward()
    ref = float64_copy(moe)
    x64 = x.detach().double().requires_grad_()
    expected = masked_dense(ref, x64, expert, gate.detach().double())
    expected.sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), **tolerance(dtype))
    torch.testing.assert_close(x.grad.double(), x64.grad, **tolerance(dtype))
    assert out.shape == (len(expert), 8)


def test_an_expert_index_outside_the_experts_raises_a_clear_error():
    moe = MoEFeedForward(4, 4, 2)
    routing = Routing(expert=torch.tensor([0, 2]), gate=torch.ones(2), probs=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"routing.expert must lie in \[0, 2\), got 2"):
        moe.dispatch(torch.randn(2, 4), routing)


@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**16))
def test_route_is_the_softmax_argmax_and_its_maximum(tokens, n_experts, seed):
    torch.manual_seed(seed)
    moe = MoEFeedForward(6, 4, n_experts).double()
    x = torch.randn(tokens, 6, dtype=torch.float64)
    routing = moe.route(x)
    probs = torch.softmax(x @ moe.router.weight.T + moe.router.bias, dim=-1)
    torch.testing.assert_close(routing.probs, probs, rtol=1e-12, atol=1e-12)
    assert torch.equal(routing.expert, probs.argmax(dim=-1))
    torch.testing.assert_close(routing.gate, probs.max(dim=-1).values, rtol=1e-12, atol=1e-12)


@given(st.integers(0, 30), st.integers(1, 5), st.sampled_from([torch.float32, torch.float64]),
       st.data())
def test_without_autograd_the_routing_is_the_routing_autograd_sees(tokens, n_experts, dtype,
                                                                   data):
    """The no-grad path takes the maximum in a kernel of its own: the same gate and expert as
    torch's ``max``, bit for bit, also where experts tie (the first wins) and where a logit is
    NaN (the NaN's expert, its gate NaN: nothing hides it)."""
    values = st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("nan")]) | st.floats(-5, 5)
    logits = torch.tensor(data.draw(st.lists(values, min_size=n_experts * tokens,
                                             max_size=n_experts * tokens)),
                          dtype=dtype).view(n_experts, tokens)
    moe = MoEFeedForward(4, 4, n_experts).to(dtype)
    with torch.no_grad():
        fast = moe.route_logits(logits)
    slow = moe.route_logits(logits.clone().requires_grad_())
    assert torch.equal(fast.expert, slow.expert)
    torch.testing.assert_close(fast.gate, slow.gate.detach(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fast.probs, slow.probs.detach(), rtol=0, atol=0, equal_nan=True)


# -- the router learns from the task loss through the gate -----------------------------------


@given(st.integers(1, 20), st.integers(2, 4), st.integers(0, 2**16))
def test_the_router_gradient_of_the_task_output_equals_the_masked_dense_reference(
        tokens, n_experts, seed):
    """In eval mode (no balance term) the router learns only through the gate: its gradient
    equals that of sum_e [argmax == e] softmax_e E_e(x) with the mask held constant."""
    torch.manual_seed(seed)
    moe = MoEFeedForward(8, 8, n_experts).eval()
    with torch.no_grad():
        moe.router.weight.mul_(5.0)  # spread the router's probabilities
    x = torch.randn(tokens, 8)
    weights = torch.randn(tokens, 8, dtype=torch.float64)
    out, balance = moe(x)
    (out.double() * weights).sum().backward()
    assert float(balance) == 0.0

    ref = float64_copy(moe)
    x64 = x.double()
    probs = torch.softmax(ref.router(x64), dim=-1)
    expert = probs.argmax(dim=-1)
    gate = probs.gather(1, expert[:, None]).squeeze(1)
    (masked_dense(ref, x64, expert, gate) * weights).sum().backward()
    assert ref.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(moe.router.weight.grad.double(), ref.router.weight.grad,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moe.router.bias.grad.double(), ref.router.bias.grad,
                               rtol=1e-4, atol=1e-4)


def test_with_balance_weight_zero_the_router_gradient_equals_finite_differences():
    """The whole model in float64, trained on the task loss alone: central differences of the
    loss in a few router weights equal the backward pass (routing does not flip at 1e-6)."""
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=11, d_model=8, n_layers=2, n_seq=12, n_experts=3, d_expert=8,
                      bk_channels=2, balance_weight=0.0)
    model = LanguageModel(cfg).double().train()
    with torch.no_grad():
        for block in model.blocks:
            block.moe.router.weight.mul_(20.0)
    x = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(0))
    model(x, x).loss.backward()
    for block in model.blocks:
        w = block.moe.router.weight
        assert w.grad.abs().max() > 1e-3
        for index in [(0, 0), (1, 3), (2, 7)]:
            with torch.no_grad():
                original = float(w[index])
                w[index] = original + 1e-6
                up = float(model(x, x).loss)
                w[index] = original - 1e-6
                down = float(model(x, x).loss)
                w[index] = original
            assert (up - down) / 2e-6 == pytest.approx(float(w.grad[index]), rel=1e-5, abs=1e-9)


# -- the balance loss ------------------------------------------------------------------------


@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**16))
def test_the_balance_loss_and_its_gradient_equal_their_analytic_values(tokens, n_experts, seed):
    """B = E sum_e f_e P_e with P_e = mean_t p_te, f_e constant: dB/dlogit_tk =
    (E / T) p_tk (f_k - sum_e f_e p_te)."""
    torch.manual_seed(seed)
    moe = MoEFeedForward(4, 4, n_experts).double()
    logits = (torch.randn(n_experts, tokens, dtype=torch.float64) * 3).requires_grad_()
    routing = moe.route_logits(logits)
    balance = moe.balance_loss(routing)
    balance.backward()
    p = torch.softmax(logits.detach(), dim=0)  # (E, T)
    f = torch.bincount(p.argmax(dim=0), minlength=n_experts).double() / tokens
    assert float(balance.detach()) == pytest.approx(n_experts * float((f * p.mean(dim=1)).sum()),
                                           rel=1e-12)
    expected = n_experts / tokens * p * (f[:, None] - (f[:, None] * p).sum(dim=0))
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-12)


@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**16))
def test_a_balance_loss_over_valid_tokens_is_the_loss_of_those_tokens_alone(tokens, n_experts,
                                                                           seed):
    """Padding tokens (invalid) change neither the loss nor its gradient; none valid gives 0."""
    torch.manual_seed(seed)
    moe = MoEFeedForward(4, 4, n_experts).double()
    logits = (torch.randn(n_experts, tokens, dtype=torch.float64) * 3).requires_grad_()
    valid = torch.rand(tokens, generator=torch.Generator().manual_seed(seed)) < 0.6
    balance = moe.balance_loss(moe.route_logits(logits), valid)
    (grad,) = torch.autograd.grad(balance, logits)
    if not valid.any():
        assert float(balance.detach()) == 0.0 and not grad.any()
        return
    kept = logits.detach()[:, valid].requires_grad_()
    expected = moe.balance_loss(moe.route_logits(kept))
    (expected_grad,) = torch.autograd.grad(expected, kept)
    torch.testing.assert_close(balance, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[:, valid], expected_grad, rtol=1e-10, atol=1e-14)
    assert not grad[:, ~valid].any()


def test_the_balance_term_of_the_training_loss_has_its_analytic_router_gradient():
    """Model level, last layer L (no later balance term depends on its router):
    grad(loss, w = b) - grad(loss, w = 0) = (b / L) dB_L/dW = (b / L) (dB_L/dlogits)^T h with
    h the layer's normalised input."""
    torch.manual_seed(1)
    weight = 0.5
    cfg = ModelConfig(vocab_size=11, d_model=8, n_layers=2, n_seq=10, n_experts=3, d_expert=8,
                      bk_channels=2, balance_weight=weight)
    model = LanguageModel(cfg).double().train()
    x = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(0))
    last = model.blocks[-1]
    inputs = []
    hook = last.norm.register_forward_hook(lambda m, i, o: inputs.append(o.detach()))
    model(x, x).loss.backward()
    hook.remove()
    free = LanguageModel(replace(cfg, balance_weight=0.0)).double().train()
    free.load_state_dict(model.state_dict())
    free(x, x).loss.backward()

    (h,) = inputs
    router = last.moe.router
    p = torch.softmax(h @ router.weight.detach().T + router.bias.detach(), dim=-1).T  # (E, T)
    n_experts, tokens = p.shape
    f = torch.bincount(p.argmax(dim=0), minlength=n_experts).double() / tokens
    d_logits = n_experts / tokens * p * (f[:, None] - (f[:, None] * p).sum(dim=0))
    expected = weight / cfg.n_layers * d_logits @ h
    assert expected.abs().max() > 1e-4
    difference = router.weight.grad - free.blocks[-1].moe.router.weight.grad
    torch.testing.assert_close(difference, expected, rtol=1e-8, atol=1e-12)


def test_the_balance_loss_is_zero_in_eval_mode_and_counts_in_training():
    torch.manual_seed(0)
    moe = MoEFeedForward(4, 4, 3)
    x = torch.randn(10, 4)
    assert float(moe.eval()(x)[1]) == 0.0
    assert float(moe.train()(x)[1].detach()) > 0.0


def test_the_weights_kept_between_no_grad_calls_follow_every_parameter_change():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 8, 3)
    x = torch.randn(20, 8)
    expert = torch.tensor([0, 1, 2, 0, 2] * 4)
    routing = Routing(expert=expert, gate=torch.rand(20), probs=x.new_empty(0, 0))

    def check():
        with torch.no_grad():
            got = moe.dispatch(x.to(moe.router.weight.dtype), routing)
            ref = float64_copy(moe)
            expected = masked_dense(ref, x.double(), expert, routing.gate.double())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    check()
    for name in ("up.weight", "up.bias", "down.weight", "down.bias"):  # in place
        with torch.no_grad():
            moe.experts[1].get_parameter(name).add_(1.0)
        check()
    other = MoEFeedForward(8, 8, 3)
    moe.load_state_dict(other.state_dict())  # copied in place
    check()
    moe.double()  # replaced
    routing.gate = routing.gate.double()
    check()
