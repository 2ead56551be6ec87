"""Properties of MaxEnt-TS (bk.maxent_ts): tree bookkeeping, the soft backup, the state cache."""

import math
from unittest.mock import patch

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bk.decode import generate
from bk.maxent_ts import (
    LogLikelihoodReward,
    MaxEntTS,
    Node,
    SearchConfig,
    maxent_ts,
    soft_value,
)
from tests.strategies import EOS, model_seeds, seeds, tiny_model, token_sequences


def scorer(prompt_length: int) -> LogLikelihoodReward:
    return LogLikelihoodReward(tiny_model(99), prompt_length)


prompts = token_sequences(max_len=6)


@st.composite
def configs(draw, **fixed) -> SearchConfig:
    values = dict(
        rollouts=draw(st.integers(1, 10)),
        max_new_tokens=draw(st.integers(1, 5)),
        top_k=draw(st.integers(1, 4)),
        lam=draw(st.sampled_from([0.05, 1.0, 20.0])),
        eos_id=draw(st.sampled_from([None, EOS])),
        selection=draw(st.sampled_from(["boltzmann", "uct"])),
        temperature=draw(st.sampled_from([0.0, 1.0])),
        seed=draw(st.integers(0, 1000)),
    )
    return SearchConfig(**(values | fixed))


# Each example runs a whole search: fewer examples than the profile's keep the file fast.
searches = settings(max_examples=12)


def search(seed, prompt, config, eos_boost=1.0):
    return MaxEntTS(tiny_model(seed, eos_boost), prompt, scorer(len(prompt)), config)


values_and_priors = st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-50, 50), min_size=n, max_size=n),
    st.lists(st.floats(1e-3, 1.0), min_size=n, max_size=n)))


@searches
@given(model_seeds, prompts, configs())
def test_root_visits_equal_the_number_of_rollouts(seed, prompt, config):
    result = search(seed, prompt, config).run()
    assert result.root.visits == config.rollouts == len(result.rollouts)


@searches
@given(model_seeds, prompts, configs())
def test_a_nodes_visits_are_its_own_rollout_plus_its_childrens_visits(seed, prompt, config):
    root = search(seed, prompt, config).run().root
    assert root.visits == sum(c.visits for c in root.children)
    for node in root.walk():
        if node is not root and node.children:
            assert node.visits == 1 + sum(c.visits for c in node.children)


@searches
@given(model_seeds, prompts, configs(rollouts=12, max_new_tokens=3, top_k=2, eos_id=EOS))
def test_terminal_nodes_are_never_expanded(seed, prompt, config):
    root = search(seed, prompt, config, eos_boost=4.0).run().root
    terminals = [n for n in root.walk() if n.terminal]
    assert any(n.visits for n in terminals)  # the search did reach terminal nodes
    for node in terminals:
        assert node.children == []
        assert node.token == EOS or node.depth == config.max_new_tokens
    for node in root.walk():
        assert node.depth <= config.max_new_tokens


@searches
@given(model_seeds, prompts, configs(rollouts=12, max_new_tokens=3, top_k=2, eos_id=EOS))
def test_sequences_end_at_their_first_eos_and_within_the_token_budget(seed, prompt, config):
    result = search(seed, prompt, config, eos_boost=2.0).run()
    for rollout in result.rollouts:
        generated = rollout.tokens[len(prompt):]
        assert 1 <= len(generated) <= config.max_new_tokens
        assert torch.equal(rollout.tokens[:len(prompt)], prompt)
        assert EOS not in generated[:-1].tolist()


@given(values_and_priors, st.floats(1e-3, 1e3))
def test_a_backed_up_value_lies_between_its_childrens_min_and_max(vp, lam):
    values, priors = vp
    v = soft_value(values, priors, lam)
    scale = 1e-12 * max(1.0, max(abs(x) for x in values))
    assert min(values) - scale <= v <= max(values) + scale


@given(values_and_priors, st.floats(0.5, 50))
def test_the_soft_value_equals_its_float64_definition(vp, lam):
    values, priors = vp
    pi = torch.tensor(priors, dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    oracle = lam * torch.logsumexp(torch.log(pi / pi.sum()) + v / lam, dim=0)
    assert soft_value(values, priors, lam) == pytest.approx(float(oracle), rel=1e-12, abs=1e-12)


@given(values_and_priors)
def test_the_soft_value_tends_to_the_max_as_lam_goes_to_zero(vp):
    values, priors = vp
    assert soft_value(values, priors, 1e-9) == pytest.approx(max(values), abs=1e-6)


@given(values_and_priors)
def test_the_soft_value_tends_to_the_prior_weighted_mean_as_lam_grows(vp):
    values, priors = vp
    mean = math.fsum(p * v for p, v in zip(priors, values, strict=True)) / math.fsum(priors)
    assert soft_value(values, priors, 1e9) == pytest.approx(mean, abs=1e-5)


children_values_and_priors = st.lists(st.tuples(st.floats(-5, 5), st.floats(1e-3, 1.0)),
                                      min_size=2, max_size=5)


@given(children_values_and_priors, st.floats(0.05, 20), seeds)
@example([(0.0, 0.5), (-1.0, 0.25), (-2.0, 0.25)], 0.5, 0)
@example([(1.0, 0.1), (0.0, 0.9)], 4.0, 1)
def test_boltzmann_selection_draws_a_child_with_probability_pi_exp_v_over_lam(children, lam,
                                                                               seed):
    ts = search(0, torch.tensor([1, 2]), SearchConfig(lam=lam, seed=seed))
    root = ts.root
    root.children = [Node(token, prior, 1, False, root, visits=1, value=value)
                     for token, (value, prior) in enumerate(children)]
    root.visits = len(children) + 1
    # float64 oracle: p_c proportional to pi_c exp(V_c / lam), the soft backup's optimal policy
    exponents = [math.log(prior) + value / lam for value, prior in children]
    weights = [math.exp(e - max(exponents)) for e in exponents]
    expected = torch.tensor([w / math.fsum(weights) for w in weights], dtype=torch.float64)
    with patch("torch.multinomial", wraps=torch.multinomial) as drawn:
        picks = [ts.select(root).token for _ in range(20)]
    for call in drawn.call_args_list:
        torch.testing.assert_close(call.args[0], expected, rtol=1e-12, atol=1e-15)
    assert len(drawn.call_args_list) == 20
    generator = torch.Generator().manual_seed(seed)
    assert picks == [int(torch.multinomial(expected, 1, generator=generator))
                     for _ in range(20)]


@searches
@given(model_seeds, prompts, configs())
def test_every_searched_value_is_the_soft_backup_of_its_visited_children(seed, prompt, config):
    root = search(seed, prompt, config).run().root
    for node in root.walk():
        seen = [c for c in node.children if c.visits]
        if seen:
            lo, hi = min(c.value for c in seen), max(c.value for c in seen)
            assert lo - 1e-12 <= node.value <= hi + 1e-12
            assert node.value == soft_value([c.value for c in seen], [c.prior for c in seen],
                                            config.lam)


@searches
@given(model_seeds, prompts, st.integers(1, 10), st.sampled_from([None, EOS]))
def test_top_k_one_with_one_greedy_rollout_equals_greedy_decoding(seed, prompt, n, eos):
    config = SearchConfig(rollouts=1, max_new_tokens=n, top_k=1, temperature=0, eos_id=eos)
    result = search(seed, prompt, config, eos_boost=2.0).run()
    greedy = generate(tiny_model(seed, 2.0), prompt[None], n, temperature=0, eos_id=eos)[0]
    assert torch.equal(result.best.tokens, greedy)


@searches
@given(model_seeds, prompts, configs())
def test_the_search_without_the_cache_finds_the_same_sequences_as_with_it(seed, prompt, config):
    cached = search(seed, prompt, config).run()
    recomputed = search(seed, prompt, SearchConfig(**(vars(config) | {"use_cache": False}))).run()
    assert [r.reward for r in cached.rollouts] == pytest.approx(
        [r.reward for r in recomputed.rollouts], rel=1e-12, abs=1e-12)
    for a, b in zip(cached.rollouts, recomputed.rollouts, strict=True):
        assert torch.equal(a.tokens, b.tokens)
    assert recomputed.work.positions >= cached.work.positions


@searches
@given(model_seeds, prompts, configs())
def test_the_cached_search_never_runs_a_full_forward_pass(seed, prompt, config):
    ts = search(seed, prompt, config)
    recompute = AssertionError("the cached search ran a full forward pass over a prefix")
    with patch.object(ts.model, "forward", side_effect=recompute):
        ts.run()


@searches
@given(model_seeds, prompts, seeds)
def test_expanding_a_sibling_never_changes_the_parents_state(seed, prompt, order_seed):
    ts = search(seed, prompt, SearchConfig(top_k=4, max_new_tokens=5))
    ts.expand(ts.root)
    parent = ts.root.children[0]
    ts.cache(parent)
    ts.expand(parent)
    snapshot = [g.clone() for g in parent.state.g]
    logits = parent.logits.clone()
    order = torch.randperm(4, generator=torch.Generator().manual_seed(order_seed)).tolist()
    first = parent.children[order[0]]
    ts.cache(first)
    first_state = [g.clone() for g in first.state.g]
    for i in order[1:]:
        ts.cache(parent.children[i])
        ts.expand(parent.children[i])
    assert all(torch.equal(g, s) for g, s in zip(parent.state.g, snapshot, strict=True))
    assert torch.equal(parent.logits, logits)
    assert all(torch.equal(g, s) for g, s in zip(first.state.g, first_state, strict=True))


def test_a_nan_reward_raises_instead_of_being_backed_up():
    with pytest.raises(ValueError, match="reward"):
        maxent_ts(tiny_model(0), torch.tensor([1, 2]), lambda tokens: float("nan"),
                  SearchConfig(rollouts=2, max_new_tokens=3))


def test_expanding_a_terminal_node_raises():
    ts = search(0, torch.tensor([1]), SearchConfig(max_new_tokens=1))
    ts.expand(ts.root)
    with pytest.raises(ValueError, match="terminal"):
        ts.expand(ts.root.children[0])


@pytest.mark.parametrize(("change", "message"), [
    (dict(rollouts=0), "rollouts"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=0), "top_k"),
    (dict(lam=0.0), "lam"),
    (dict(lam=float("inf")), "lam"),
    (dict(uct_c=-1.0), "uct_c"),
    (dict(selection="greedy"), "selection"),
])
def test_a_bad_search_config_raises_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**change)


@pytest.mark.parametrize(("prompt", "config", "error", "message"), [
    (torch.tensor([[1, 2]]), SearchConfig(), ValueError, "1-D"),
    (torch.tensor([1, 40]), SearchConfig(), ValueError, r"\[0, 17\)"),
    (torch.tensor([1, 2]), SearchConfig(top_k=18), ValueError, "top_k"),
    (torch.tensor([1, 2]), SearchConfig(eos_id=17), ValueError, "eos_id"),
    (torch.tensor([1, 2]), SearchConfig(temperature=-1.0), ValueError, "temperature"),
])
def test_bad_search_arguments_raise_a_clear_error(prompt, config, error, message):
    with pytest.raises(error, match=message):
        MaxEntTS(tiny_model(0), prompt, scorer(2), config)


def test_the_log_likelihood_reward_rejects_a_sequence_no_longer_than_the_prompt():
    with pytest.raises(ValueError, match="longer than the prompt"):
        scorer(3)(torch.tensor([1, 2, 3]))


def test_node_paths_read_the_generated_tokens_from_the_root():
    root = Node(None, 1.0, 0, False)
    child = Node(4, 0.5, 1, False, root)
    assert Node(7, 0.5, 2, True, child).path() == [4, 7]
