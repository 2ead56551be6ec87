"""Properties of the verified routing cache, the fast path and the tiered top-1 routing."""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.registry import get
from bk.adaptive.routing_cache import (
    PRESETS,
    TIER_NAMES,
    CachedRoutingLanguageModel,
    RoutingCache,
    context_windows,
    route_rest,
    window_keys,
)
from bk.model import LanguageModel, Work
from bk.skip import Subset
from bk.technique import Forcing, KnobError
from tests.strategies import TINY, FakeClock, random_tokens, seeds, token_batches

WIDTH = 3


def entries(keys: list[int]) -> tuple[torch.Tensor, ...]:
    """Cache arguments for ``keys``: the window is derived from the key, expert and gate too."""
    k = torch.tensor(keys, dtype=torch.int64)
    windows = torch.stack([k, k + 1, k + 2], dim=1)
    return k, windows, k % 3, (k % 7 + 1).float() / 8


key_lists = st.lists(st.integers(0, 30), max_size=12)


NEVER = 1e9  # a frequency threshold no calibration reaches: the fast path takes nothing


def models(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    dense = LanguageModel(TINY)
    cached = CachedRoutingLanguageModel(TINY, **kwargs)
    cached.load_state_dict(dense.state_dict(), strict=False)
    return dense.eval(), cached.eval()


def assert_same_work(got: Work, want: Work, routes_given: int = 0) -> None:
    fields = ("token_layers", "expert_calls", "positions")
    assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
    assert got.routes_given == routes_given


batches = token_batches(max_len=TINY.n_seq)


# -- keys ------------------------------------------------------------------------------------


@given(batches, st.integers(0, 5))
def test_context_windows_hold_the_previous_ids_and_the_token_padded_at_the_start(idx, w):
    windows = context_windows(idx, w, pad=TINY.vocab_size)
    b, n = idx.shape
    assert windows.shape == (b, n, w + 1)
    for i in range(b):
        for t in range(n):
            expected = [int(idx[i, s]) if s >= 0 else TINY.vocab_size for s in range(t - w, t + 1)]
            assert windows[i, t].tolist() == expected


@given(batches, st.integers(0, 5))
def test_equal_windows_get_equal_keys(idx, w):
    windows = context_windows(idx, w, pad=TINY.vocab_size).reshape(-1, w + 1)
    keys = window_keys(windows)
    same_window = (windows[:, None, :] == windows[None, :, :]).all(dim=-1)
    assert bool((keys[:, None] == keys[None, :])[same_window].all())
    assert keys.dtype == torch.int64 and bool((keys >= 0).all())


# -- the cache -------------------------------------------------------------------------------


@given(key_lists)
def test_an_exact_cache_hit_returns_the_inserted_expert_and_gate(keys):
    cache = RoutingCache(100, 60.0, WIDTH, clock=FakeClock())
    k, windows, expert, gate = entries(keys)
    cache.insert(k, windows, expert, gate)
    found = cache.lookup(k, windows)
    assert bool(found.hit.all())
    assert torch.equal(found.expert, expert) and torch.equal(found.gate, gate)


@given(key_lists)
def test_a_key_with_a_different_window_is_a_miss(keys):
    cache = RoutingCache(100, 60.0, WIDTH, clock=FakeClock())
    k, windows, expert, gate = entries(keys)
    cache.insert(k, windows, expert, gate)
    assert not bool(cache.lookup(k, windows + 100).hit.any())


@given(st.integers(0, 6), st.lists(st.tuples(st.booleans(), key_lists), max_size=8))
def test_the_cache_never_exceeds_its_size_and_keeps_keys_sorted_and_unique(capacity, ops):
    cache = RoutingCache(capacity, 60.0, WIDTH, clock=FakeClock())
    for is_insert, keys in ops:
        k, windows, expert, gate = entries(keys)
        if is_insert:
            cache.insert(k, windows, expert, gate)
        else:
            cache.lookup(k, windows)
        assert len(cache) <= capacity
        assert bool((cache.keys[1:] > cache.keys[:-1]).all())


def reference_lru(capacity: int, ops) -> set[int]:
    """The documented eviction rule, simulated one entry at a time in Python."""
    entries_: dict[int, tuple[int, int]] = {}  # key -> (last use tick, insertion serial)
    tick = serial = 0
    for is_insert, keys in ops:
        if not is_insert:
            if entries_ and keys:
                tick += 1
                for key in keys:
                    if key in entries_:
                        entries_[key] = (tick, entries_[key][1])
            continue
        if not keys or capacity == 0:
            continue
        tick += 1
        last_position = {key: pos for pos, key in enumerate(keys)}
        for key, pos in last_position.items():
            entries_[key] = (tick, serial + pos)
        serial += len(keys)
        while len(entries_) > capacity:
            victim = min(entries_, key=lambda key: entries_[key])
            del entries_[victim]
    return set(entries_)


@given(st.integers(0, 6), st.lists(st.tuples(st.booleans(), key_lists), max_size=8))
def test_eviction_removes_the_least_recently_used_entries_as_documented(capacity, ops):
    cache = RoutingCache(capacity, 60.0, WIDTH, clock=FakeClock())
    for is_insert, keys in ops:
        k, windows, expert, gate = entries(keys)
        (cache.insert if is_insert else cache.lookup)(*((k, windows, expert, gate) if is_insert
                                                       else (k, windows)))
    assert set(cache.keys.tolist()) == reference_lru(capacity, ops)


# Whole seconds make "exactly ttl_seconds old" (expired) a common case.
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 5)), min_size=1, max_size=10),
       st.integers(0, 200), st.integers(1, 50))
def test_expiry_follows_the_clock(insertions, query_time, ttl):
    clock = FakeClock()
    cache = RoutingCache(100, ttl, WIDTH, clock=clock)
    inserted_at: dict[int, float] = {}
    for when, key in sorted(insertions):
        clock.now = when
        if when - inserted_at.get(key, -math.inf) >= ttl:
            inserted_at.pop(key, None)  # the old entry expired before this insertion
        cache.insert(*entries([key]))
        inserted_at[key] = when
    clock.now = max(query_time, clock.now)
    keys = sorted(inserted_at)
    found = cache.lookup(*entries(keys)[:2])
    expected = [clock.now - inserted_at[key] < ttl for key in keys]
    assert found.hit.tolist() == expected
    assert len(cache) == sum(expected)


@pytest.mark.parametrize("age, alive", [(0.0, True), (59.999, True), (60.0, False), (61.0, False)])
def test_an_entry_expires_exactly_ttl_seconds_after_insertion_and_hits_do_not_extend_it(age,
                                                                                        alive):
    clock = FakeClock()
    cache = RoutingCache(10, 60.0, WIDTH, clock=clock)
    cache.insert(*entries([7]))
    clock.now = age / 2
    assert bool(cache.lookup(*entries([7])[:2]).hit.all())
    clock.now = age
    assert cache.lookup(*entries([7])[:2]).hit.tolist() == [alive]
    assert len(cache) == int(alive)


def test_bad_cache_input_is_rejected_with_a_clear_error():
    cache = RoutingCache(10, 60.0, WIDTH, clock=FakeClock())
    k, windows, expert, gate = entries([1, 2])
    with pytest.raises(ValueError, match="probabilities"):
        cache.insert(k, windows, expert, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="windows must be int64 of shape"):
        cache.lookup(k, windows[:, :2])
    with pytest.raises(TypeError, match="1-D int64"):
        cache.lookup(k.float(), windows)


# -- knobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs, name", [
    ({"cache_ttl_seconds": 0}, "cache_ttl_seconds"),
    ({"entropy_threshold": float("nan")}, "entropy_threshold"),
    ({"cache_size": 2.5}, "cache_size"), ({"context_window_size": 1.5}, "context_window_size"),
    ({"cache_size": -1}, "cache_size"), ({"confidence_threshold": 1.5}, "confidence_threshold"),
    ({"frequency_threshold": float("inf")}, "frequency_threshold"),
    ({"preset": "fast"}, "preset"),
])
def test_bad_knobs_are_rejected_naming_the_knob(knobs, name):
    with pytest.raises(KnobError, match=f"knob {name}"):
        CachedRoutingLanguageModel(TINY, **knobs)
    with pytest.raises(KnobError, match=f"knob {name}"):
        get("routing_cache").make(TINY, knobs)


def test_the_preset_and_its_overrides_give_the_settings():
    technique = get("routing_cache")
    assert technique.defaults() == {"preset": "balanced", "frequency_threshold": None,
                                    "entropy_threshold": None, "confidence_threshold": None,
                                    "cache_size": None, "cache_ttl_seconds": None,
                                    "context_window_size": None}
    assert technique.updates_weights is False
    model = technique.make(TINY, {"preset": "aggressive", "cache_size": "64",
                                  "context_window_size": 3.0, "entropy_threshold": "none"})
    assert model.settings == replace(PRESETS["aggressive"], cache_size=64, context_window_size=3)
    assert isinstance(model.settings.cache_size, int)
    assert model.caches[0].capacity == 64 and model.caches[0].width == 4
    assert model.knob_values()["cache_size"] == 64 and model.calibrate_only
    assert technique.make(TINY, {"preset": "off", "cache_size": 8}).settings.enabled is False


# -- the model -------------------------------------------------------------------------------


@given(batches, seeds)
def test_disabled_routing_equals_the_baseline_router_bit_for_bit(idx, seed):
    y = random_tokens(seed + 1, *idx.shape)
    dense, cached = models(seed=seed, preset="off")
    cached.observe_batches([idx])  # a fast-path table exists but must not be used
    with torch.no_grad():
        for _ in range(2):
            want, got = dense(idx, y), cached(idx, y)
            assert torch.equal(want.logits, got.logits)
            assert torch.equal(want.loss, got.loss)
            assert_same_work(got.work, want.work)


@given(batches, seeds)
def test_tiers_that_take_nothing_equal_the_baseline_router_bit_for_bit(idx, seed):
    dense, cached = models(seed=seed, cache_size=0, frequency_threshold=NEVER)
    cached.observe_batches([idx])
    with torch.no_grad():
        want, got = dense(idx), cached(idx)
    assert torch.equal(want.logits, got.logits)
    assert float(got.stats["tier_router"].min()) == 1.0
    assert_same_work(got.work, want.work)


@given(batches, seeds)
def test_a_cache_covering_the_whole_prefix_reproduces_the_router_on_the_next_pass(idx, seed):
    # With the window as long as the sequence the key determines the hidden state, so a hit
    # must give the decision recomputation would give.
    dense, cached = models(seed=seed, confidence_threshold=0.0,
                           context_window_size=TINY.n_seq, frequency_threshold=NEVER,
                           clock=FakeClock())
    with torch.no_grad():
        want = dense(idx)
        first, second = cached(idx), cached(idx)
    assert float(first.stats["tier_router"].min()) == 1.0
    assert float(second.stats["tier_cache"].min()) == 1.0
    torch.testing.assert_close(second.logits, want.logits)


@given(batches, seeds, st.sampled_from(sorted(PRESETS)), st.integers(0, 3))
def test_tiered_routing_keeps_the_router_output_shape_dtype_and_top1_meaning(idx, seed, preset,
                                                                             warm_passes):
    dense, cached = models(seed=seed, preset=preset, confidence_threshold=0.5,
                           clock=FakeClock())
    cached.observe_batches([idx, random_tokens(seed + 7, 4, TINY.n_seq)])
    for _ in range(warm_passes):
        with torch.no_grad():
            cached(idx)
    block = cached.blocks[0]
    with torch.no_grad():
        h = block.norm(cached.embed(idx).reshape(-1, TINY.d_model))
        windows = context_windows(idx, cached.settings.context_window_size,
                                  TINY.vocab_size).reshape(idx.numel(), -1)
        routing, tier = cached.route_tiers(0, block.moe, h, idx.reshape(-1),
                                           window_keys(windows), windows)
        baseline = block.moe.route(h)
    assert routing.expert.shape == baseline.expert.shape and routing.expert.dtype == torch.int64
    assert routing.gate.shape == baseline.gate.shape and routing.gate.dtype == baseline.gate.dtype
    assert bool(((routing.expert >= 0) & (routing.expert < TINY.n_experts)).all())
    assert bool(((routing.gate > 0) & (routing.gate <= 1)).all())
    by_router = tier == TIER_NAMES.index("router")
    assert torch.equal(routing.expert[by_router], baseline.expert[by_router])
    torch.testing.assert_close(routing.gate[by_router], baseline.gate[by_router])
    expert_table, gate_table = cached.fast_path_table()
    fast = tier == TIER_NAMES.index("fast_path")
    tokens = idx.reshape(-1)
    assert torch.equal(routing.expert[fast], expert_table[0, tokens[fast]])
    assert torch.equal(routing.gate[fast], gate_table[0, tokens[fast]])


@given(seeds, st.floats(0.0, 1.4), st.integers(1, 40))
def test_the_fast_path_takes_exactly_the_frequent_low_entropy_tokens(seed, entropy_cap, min_count):
    _, cached = models(seed=seed, frequency_threshold=min_count, entropy_threshold=entropy_cap)
    idx = random_tokens(seed, 3, TINY.n_seq)
    cached.observe_batches([idx])
    dense64 = LanguageModel(TINY).double()
    dense64.load_state_dict({k: v for k, v in cached.state_dict().items()
                             if k in dense64.state_dict()})
    counts = torch.bincount(idx.reshape(-1), minlength=TINY.vocab_size).double()
    x = dense64.embed(idx)
    expert_table, _ = cached.fast_path_table()
    with torch.no_grad():
        for layer, block in enumerate(dense64.blocks):
            h = block.norm(x.reshape(idx.numel(), -1))
            probs = torch.softmax(block.moe.router(h), dim=-1)
            sums = torch.zeros(TINY.vocab_size, TINY.n_experts, dtype=torch.float64)
            sums.index_add_(0, idx.reshape(-1), probs)
            for token in range(TINY.vocab_size):
                if counts[token] == 0:
                    assert int(expert_table[layer, token]) == -1
                    continue
                mean = sums[token] / counts[token]
                entropy = -float((mean * mean.log()).nan_to_num(0.0).sum())
                if abs(entropy - entropy_cap) < 1e-5:
                    continue  # float32 statistics may fall on either side of the threshold
                eligible = counts[token] >= min_count and entropy <= entropy_cap
                assert (int(expert_table[layer, token]) >= 0) == eligible
                if eligible:
                    assert int(expert_table[layer, token]) == int(mean.argmax())
            x, _ = block(x)


@given(batches, seeds, st.sampled_from(sorted(PRESETS)))
def test_each_token_layer_is_decided_by_exactly_one_tier(idx, seed, preset):
    _, cached = models(seed=seed, preset=preset, clock=FakeClock())
    cached.observe_batches([random_tokens(seed + 1, 4, TINY.n_seq)])
    with torch.no_grad():
        cached(idx)
        out = cached(idx)
    total = sum(out.stats[f"tier_{name}"] for name in TIER_NAMES)
    torch.testing.assert_close(total, torch.ones(idx.shape))
    layers = TINY.n_layers
    assert out.work.token_layers == out.work.expert_calls == idx.numel() * layers
    given = (out.stats["tier_cache"] + out.stats["tier_fast_path"]).sum() * layers
    assert out.work.routes_given == round(float(given))


def test_calibration_steps_leave_the_dense_weights_exactly_unchanged():
    _, cached = models(calibrate_only=True)
    before = {k: v.clone() for k, v in cached.state_dict().items()}
    optimizer = torch.optim.AdamW(cached.parameters(), lr=1e-2, weight_decay=0.1)
    cached.train()
    for seed in range(3):
        x, y = random_tokens(seed, 2, TINY.n_seq), random_tokens(seed + 10, 2, TINY.n_seq)
        optimizer.zero_grad()
        cached(x, y).loss.backward()
        optimizer.step()
    for name, tensor in cached.state_dict().items():
        if name not in ("token_counts", "prob_sums"):
            assert torch.equal(tensor, before[name]), name
    assert float(cached.token_counts.sum()) == 3 * 2 * TINY.n_seq
    torch.testing.assert_close(cached.prob_sums.sum(dim=(1, 2)),
                               torch.full((TINY.n_layers,), 3 * 2 * TINY.n_seq,
                                          dtype=torch.float64))


def test_a_training_step_clears_the_caches():
    _, cached = models(confidence_threshold=0.0, clock=FakeClock())
    idx = random_tokens(0, 2, TINY.n_seq)
    with torch.no_grad():
        cached(idx)
    assert all(len(cache) > 0 for cache in cached.caches)
    cached.train()
    cached(idx)
    assert all(len(cache) == 0 for cache in cached.caches)


def tiny_corpus(seed: int):
    from bk.data import Corpus, Vocabulary

    g = torch.Generator().manual_seed(seed)
    vocab = Vocabulary(tuple("abcdefghijklmnopq"))
    streams = [torch.randint(0, TINY.vocab_size, (n,), generator=g) for n in (300, 50, 200)]
    return Corpus("tiny", vocab, *streams)


@given(seeds, st.sampled_from(sorted(PRESETS)))
def test_routing_stats_count_the_calibration_tokens_and_shares_sum_to_one(seed, preset):
    from bench.routing_stats import routing_stats

    corpus = tiny_corpus(seed)
    torch.manual_seed(seed)
    tables = routing_stats(LanguageModel(TINY), corpus, preset=preset,
                           calibration_batches=2, eval_batches=3, batch_size=4)
    tokens, tiers = tables["tokens"], tables["tiers"]
    calibrated = corpus.train[: 2 * 4 * TINY.n_seq]
    counts = torch.bincount(calibrated, minlength=TINY.vocab_size).tolist()
    for layer in range(TINY.n_layers):
        assert tokens[tokens.layer == layer].frequency.tolist() == counts
    entropies = tokens.router_entropy[tokens.frequency > 0]
    # float32 router probabilities sum to 1 within ~1e-7, so H(mean p) may exceed ln E by that.
    assert ((entropies >= -1e-6) & (entropies <= math.log(TINY.n_experts) + 1e-6)).all()
    assert (tokens.fast_path <= (tokens.frequency >= PRESETS[preset].frequency_threshold)).all()
    shares = tiers[list(TIER_NAMES)].sum(axis=1)
    assert ((shares - 1).abs() < 1e-9).all()
    assert list(tiers.layer) == [*map(str, range(TINY.n_layers)), "all"]


# -- work, causality, decoding -----------------------------------------------------------------


def test_work_adds_up_and_leaves_the_given_routers_out_of_the_flops():
    work = Work() + Work(10, 10, 10, routes_given=4) + Work(1, 1, 1)
    assert (work.token_layers, work.expert_calls, work.positions, work.routes_given) == (
        11, 11, 11, 4)
    router = 2 * TINY.d_model * TINY.n_experts
    assert work.flops(TINY) == Work(11, 11, 11).flops(TINY) - 4 * router


@settings(max_examples=6)
@given(seeds, st.integers(0, TINY.n_seq - 2))
def test_logits_at_a_position_do_not_depend_on_later_tokens_of_the_call(seed, i):
    # Two models in the same state see inputs that differ after position i. Their caches hold
    # every one-token-context window, inserted from other contexts, so nearly every lookup hits
    # an entry that differs from the router's decision: a key that read a later token would
    # change the logits at i.
    idx = random_tokens(seed, 2, TINY.n_seq)
    changed = idx.clone()
    changed[:, i + 1:] = random_tokens(seed + 1, 2, TINY.n_seq - i - 1)
    warm = random_tokens(seed + 2, 32, TINY.n_seq)
    outputs = []
    for x in (idx, changed):
        _, cached = models(seed=seed % 5, confidence_threshold=0.0, context_window_size=1,
                           clock=FakeClock())
        with torch.no_grad():
            cached(warm)
            out = cached(x)
        assert float(out.stats["tier_cache"].mean()) > 0.5
        outputs.append(out.logits[:, :i + 1])
    # Not bit for bit: a token's expert product is computed in a group of the call's tokens of
    # that expert, and float32 sums come out differently in another group (2e-7 seen). A key
    # that read a later token picks another expert or gate: differences of order 0.1.
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_the_model_says_why_it_does_not_decode():
    _, cached = models()
    with pytest.raises(NotImplementedError, match="caches shared across calls"):
        cached.init_state(1)
    with pytest.raises(NotImplementedError, match="caches shared across calls"):
        cached.step(torch.zeros(1, dtype=torch.int64), None)


# -- forcing ----------------------------------------------------------------------------------


def forced_pair(keep: float, pattern: str, seed: int = 0):
    """A dense model and the routing-cache model forced at ``keep``, with every tier's
    machinery made to fail and the router's rows counted."""
    dense, cached = models(seed=seed)
    cached.observe_batches([random_tokens(seed, 4, TINY.n_seq)])  # a fast-path table exists

    def fail(*args, **kwargs):
        raise AssertionError("a forced model consulted a tier")

    for cache in cached.caches:
        cache.lookup = cache.insert = fail
    cached.fast_path_table = fail
    cached.route_tiers = fail
    routed = [0]

    def counting(route):
        def counted(h):
            routed[0] += h.shape[0]
            return route(h)
        return counted

    for block in cached.blocks:
        block.moe.route = counting(block.moe.route)
    return dense, cached.forced(Forcing(keep, pattern, seed=seed)), routed


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.3, 1.0])
def test_a_uniformly_forced_model_routes_evenly_spaced_positions_and_gives_the_rest(keep):
    dense, forced, routed = forced_pair(keep, "uniform")
    idx = random_tokens(1, 3, TINY.n_seq)
    with torch.no_grad():
        out = forced(idx)
    per_sequence = math.floor(TINY.n_seq * keep)
    token_layers = idx.numel() * TINY.n_layers
    assert routed[0] == per_sequence * idx.shape[0] * TINY.n_layers
    assert out.work.routes_given == token_layers - routed[0]
    assert out.work.token_layers == out.work.expert_calls == token_layers
    given = forced.given_routing(*idx.shape).by_router.view(TINY.n_layers, *idx.shape)
    assert bool((given == given[0, 0]).all())  # the same positions in every row and layer
    if keep == 1.0:
        with torch.no_grad():
            assert torch.equal(out.logits, dense(idx).logits)


def test_a_per_token_forced_model_routes_a_random_share_and_is_reproducible():
    _, forced, routed = forced_pair(0.5, "per_token", seed=4)
    idx = random_tokens(2, 8, TINY.n_seq)
    with torch.no_grad():
        out, again = forced(idx), forced(idx)
    token_layers = idx.numel() * TINY.n_layers
    assert torch.equal(out.logits, again.logits)
    assert routed[0] == 2 * (token_layers - out.work.routes_given)
    assert abs(routed[0] / 2 - 0.5 * token_layers) <= 4 * math.sqrt(token_layers * 0.25)
    assert out.work.flops(TINY) < Work(token_layers, token_layers, token_layers).flops(TINY)


@given(seeds, st.sampled_from(["uniform", "per_token"]))
def test_the_forced_path_gives_its_experts_and_routes_the_rest_like_the_router(seed, pattern):
    _, cached = models(seed=seed)
    forced = cached.forced(Forcing(0.5, pattern, seed=seed))
    idx = random_tokens(seed, 2, TINY.n_seq)
    given = forced.given_routing(*idx.shape)
    with torch.no_grad():
        h = cached.blocks[0].norm(cached.embed(idx).reshape(idx.numel(), -1))
        routing = route_rest(cached.blocks[0].moe, h, given.expert[0], given.gate,
                             Subset.where(given.by_router[0]))
        router = cached.blocks[0].moe.route(h)
    by_router = given.by_router[0]
    assert torch.equal(routing.expert[by_router], router.expert[by_router])
    torch.testing.assert_close(routing.gate[by_router], router.gate[by_router])
    assert torch.equal(routing.expert[~by_router], given.expert[0][~by_router])
    assert bool((routing.gate[~by_router] == 1 / TINY.n_experts).all())
    assert cached.forcing is None
