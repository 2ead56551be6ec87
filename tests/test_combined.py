"""The combined model: the hourglass with depth routing and position sparsity, composed exactly.

Each axis switched off gives the model without it; with every axis on, a position still never
sees a later token, training reaches every router and predictor, and the forced model (the
ceiling) runs no decision code.
"""

import inspect
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.adaptive.combined import CombinedLanguageModel
from bk.adaptive.multiscale import MultiScaleLanguageModel
from bk.model import LanguageModel
from bk.technique import Forcing, KnobError
from tests.strategies import TINY_4_LAYERS as CONFIG
from tests.strategies import float64_model, random_tokens, seeds

OFF = {"depth_capacity": None, "target_sparsity": None}
ALL_ON = {"factor": 4, "depth_capacity": 0.5, "depth_routed": "alternate", "target_sparsity": 0.25}
HOURGLASSES = [(CONFIG, {}), (CONFIG, {"factor": 2, "levels": 2}),
               (replace(CONFIG, n_layers=5), {"factor": 2, "levels": 2, "rise": "mirror"})]


def models(config=CONFIG, **knobs):
    """The combined model with every axis on unless ``knobs`` say otherwise, and the multiscale
    model of its hourglass with the same weights."""
    combined = float64_model(0, CombinedLanguageModel, config, **{**ALL_ON, **knobs})
    multiscale = MultiScaleLanguageModel(config, factor=combined.factor, levels=combined.levels,
                                         rise=combined.rise).double().eval()
    multiscale.load_state_dict(combined.state_dict(), strict=False)
    return combined, multiscale


def randomise_decisions(combined: CombinedLanguageModel, seed: int) -> None:
    """Router and predictor logits straddling zero, so that some tokens run and some skip."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in [*combined.routers.values(), *combined.importance]:
            linear.weight.normal_(0, 1.0, generator=gen)
            linear.bias.zero_()


def no_calls(modules):
    """Hooks that fail if any of ``modules`` runs; returns their handles."""
    def fail(module, args):
        raise AssertionError("a forced model must not run its routers or predictors")
    return [m.register_forward_pre_hook(fail) for m in modules]


def test_with_both_axes_off_it_is_the_multiscale_model_and_decides_nothing():
    combined, multiscale = models(**OFF)
    assert len(combined.routers) == 0 and len(combined.importance) == 0
    x = random_tokens(0, 3, 16)
    with torch.no_grad():
        a, b = combined(x), multiscale(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    assert a.work == b.work
    assert combined.forced(Forcing(0.5)) is None  # no decisions: its ceiling is itself


def test_with_factor_one_and_both_axes_off_it_is_the_dense_model():
    combined, _ = models(factor=1, **OFF)
    dense = LanguageModel(CONFIG).double().eval()
    dense.load_state_dict(combined.state_dict(), strict=False)
    x = random_tokens(0, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(combined(x).logits, dense(x).logits, rtol=1e-12, atol=1e-12)


def test_each_declared_axis_switched_off_removes_its_own_machinery_and_all_off_is_dense():
    axes = CombinedLanguageModel.AXES
    assert set(axes) == {"sequence", "depth", "positions"}
    sequence, _ = models(**axes["sequence"])
    assert all(sequence.block_context(i) == CONFIG.n_seq for i in range(CONFIG.n_layers))
    assert len(sequence.routers) > 0 and len(sequence.importance) > 0
    depth, _ = models(**axes["depth"])
    assert len(depth.routers) == 0 and len(depth.importance) > 0
    positions, _ = models(**axes["positions"])
    assert len(positions.routers) > 0 and len(positions.importance) == 0
    combined, _ = models(**{k: v for off in axes.values() for k, v in off.items()})
    dense = LanguageModel(CONFIG).double().eval()
    dense.load_state_dict(combined.state_dict(), strict=False)
    x = random_tokens(0, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(combined(x).logits, dense(x).logits, rtol=1e-12, atol=1e-12)


def test_the_routed_blocks_have_routers_and_the_others_predictors():
    combined, _ = models(depth_routed="alternate")
    assert sorted(combined.routers) == ["1", "3"]
    assert len(combined.importance) == CONFIG.n_layers  # one per block, used where not routed
    depth_only, _ = models(target_sparsity=None)
    assert sorted(depth_only.routers) == ["1", "3"] and len(depth_only.importance) == 0


@given(n=st.integers(2, 16), cut=st.integers(1, 15), capacity=st.sampled_from([None, 0.25]),
       routed=st.sampled_from(["alternate", "inner"]), hourglass=st.sampled_from(HOURGLASSES),
       seed=seeds)
def test_a_position_never_sees_a_later_token(n, cut, capacity, routed, hourglass, seed):
    cut = min(cut, n - 1)
    config, knobs = hourglass
    combined, _ = models(config, capacity=capacity, depth_routed=routed, **knobs)
    randomise_decisions(combined, seed)
    x = random_tokens(seed, 2, n)
    y = x.clone()
    y[:, cut:] = (y[:, cut:] + 1) % CONFIG.vocab_size
    with torch.no_grad():
        a, b = combined(x).logits, combined(y).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-12)


def test_skipping_everything_the_axes_allow_is_less_work_and_stays_finite():
    x = random_tokens(0, 3, 16)
    for depth in (None, 0.5):
        combined, multiscale = models(depth_capacity=depth)
        with torch.no_grad():
            for linear in [*combined.routers.values(), *combined.importance]:
                linear.bias.fill_(-20.0)  # no router selects, every predictor skips
            out, full = combined(x), multiscale(x)
        assert torch.isfinite(out.logits).all()
        if depth is None:
            assert out.work.token_layers == 0 < full.work.token_layers
        else:  # a routed block runs its static capacity of rows, selected or not
            assert 0 < out.work.token_layers < full.work.token_layers


def test_training_reaches_every_router_and_predictor_with_each_loss_term():
    combined, _ = models(target_sparsity=0.5)
    randomise_decisions(combined, 1)
    combined.train()
    combined.schedule(1.0)
    x = random_tokens(0, 3, 16)
    out = combined(x, x)
    assert set(out.aux) == {"balance", "router", "sparsity"}
    out.loss.backward()
    for name in sorted(combined.routers):
        grad = combined.routers[name].weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"router {name} learns nothing"
    used = [i for i in range(CONFIG.n_layers) if str(i) not in combined.routers]
    for i in used:
        grad = combined.importance[i].weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"predictor {i} learns nothing"
    assert combined.eval()(x, x).aux == {}


@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_forced_runs_no_decision_code_and_at_keep_one_is_the_hourglass(keep):
    combined, multiscale = models()
    randomise_decisions(combined, 0)
    forced = combined.forced(Forcing(keep))
    assert combined.forcing is None  # the original is untouched
    hooks = no_calls([*combined.routers.values(), *combined.importance])
    x = random_tokens(0, 3, 16)
    try:
        with torch.no_grad():
            out = forced(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        full = multiscale(x)
    if keep == 1:
        torch.testing.assert_close(out.logits, full.logits, rtol=1e-12, atol=1e-12)
        assert out.work.token_layers == full.work.token_layers
    else:
        assert 0 < out.work.token_layers < full.work.token_layers


def test_forcing_a_lower_keep_never_runs_more():
    combined, _ = models()
    x = random_tokens(0, 3, 16)
    with torch.no_grad():
        work = [combined.forced(Forcing(k))(x).work.token_layers for k in (0.125, 0.25, 0.5, 1)]
    assert work == sorted(work)


def test_the_knobs_are_the_keyword_only_constructor_arguments():
    parameters = inspect.signature(CombinedLanguageModel).parameters
    declared = {k.name: k.default for k in CombinedLanguageModel.KNOBS}
    assert declared == {"factor": 2, "levels": 1, "rise": "last", "depth_capacity": 0.5,
                        "depth_routed": "inner", "router_loss_weight": 0.1,
                        "target_sparsity": None, "sparsity_weight": 1.0, "capacity": None}
    assert {name: p.default for name, p in parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY} == declared
    model = CombinedLanguageModel.from_knobs(CONFIG, {"factor": "2", "depth_capacity": "none"})
    assert model.knob_values() == {**declared, "factor": 2, "depth_capacity": None}


@pytest.mark.parametrize(("knob", "value"), [
    ("factor", 2.5), ("levels", 3), ("rise", "down"), ("target_sparsity", float("nan")),
    ("depth_capacity", 0.0), ("depth_routed", "every"), ("router_loss_weight", -1.0),
    ("sparsity_weight", -1.0), ("capacity", 0.0)])
def test_bad_knob_values_raise_errors_naming_the_knob(knob, value):
    with pytest.raises(KnobError, match=f"knob {knob}"):
        CombinedLanguageModel(CONFIG, **{knob: value})


def test_incremental_decoding_is_refused_with_its_reason():
    combined, _ = models()
    assert not CombinedLanguageModel.DECODES
    with pytest.raises(NotImplementedError, match="carried potentials"):
        combined.init_state(1)
