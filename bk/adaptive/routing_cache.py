"""A verified routing cache with a fast path in front of the top-1 router (issue 7).

At inference every (token, layer) is routed by the first of three tiers that applies:

1. **Cache** (one per layer). Key: a hash of the token id and the ``context_window_size``
   token ids before it (positions before the sequence start are a padding id, so a window
   reaching the start differs from one in mid-stream). Each entry also stores its full window,
   and a lookup only hits when the stored window equals the query's ("verified": a hash
   collision is a miss, never a wrong expert). Entries expire ``cache_ttl_seconds`` after they
   were inserted, on an injectable clock; a hit does not extend the lifetime. At most
   ``cache_size`` entries; when an insertion overflows, the least recently used entries are
   evicted (a hit or an insertion is a use; among entries last used at the same lookup or
   insertion, the one inserted first goes first, and within one insertion batch an earlier
   batch position counts as inserted first). Gate of a hit: the router probability stored when
   the entry was inserted.
2. **Fast path** (offline, one table per layer). A token id whose frequency among the
   calibration tokens is at least ``frequency_threshold`` and whose router entropy is at most
   ``entropy_threshold`` goes to its usual expert. Router entropy of a token id is the entropy
   (nats) of its mean router distribution over its calibration occurrences, ``H(mean p)``; it is
   low only when the router is both confident and consistent across contexts. Usual expert:
   ``argmax mean p``; gate: ``max mean p``.
3. **Router**: the learned top-1 router on the remaining tokens only (they are gathered, routed
   and scattered back). Its decision is inserted into the cache when its probability (the gate)
   is at least ``confidence_threshold``.

What is skipped for tokens of tiers 1 and 2 is the router: its ``d_model x n_experts`` matmul
and softmax. Everything else (norm, expert, BK mixing) runs for every token; ``Work`` is the
dense model's with those router evaluations counted apart (``Work.routes_given``). The tiers act
in eval mode only: training routes every token through the
router (the gates must receive gradient) and records the calibration statistics; any training
step clears the caches, since the router may have changed. With ``calibrate_only`` the training
loop only streams train-split batches into the statistics: the forward pass runs without
gradient and the objective is ``ce + 0 * calibration_anchor``, so no dense weight receives a
gradient and AdamW (which skips parameters without one, weight decay included) leaves them
exactly as they were; the perplexity change then measures the tiers alone.

Hashing, lookup, insertion and eviction are tensor operations over all tokens of a layer at
once (``searchsorted`` on a sorted key array, batched eviction); there is no per-token Python
loop.

Causality: a position's tiers read its own window (tokens ``<= i``) and what earlier calls left
in the caches; a call looks every position of a layer up before inserting any of that layer's
decisions, so logits at ``i`` never depend on later tokens of the call. They do depend on the
calls before it (that is what a cache is for): a hit returns the decision taken for the same
window, not necessarily for the same prefix. For the same reason the model does not decode one
position at a time (``NO_DECODE_REASON``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from bk.model import BKBlock, ModelConfig, ModelOutput, Work
from bk.moe import MoEFeedForward, Routing
from bk.skip import Subset
from bk.technique import Forcing, Knob, KnobError, TechniqueModel

Clock = Callable[[], float]

# Two polynomial hashes modulo primes below 2^31; bases below 2^20 keep every product in int64.
_PRIMES = (2_147_483_647, 2_147_483_629)
_BASES = (1_000_003, 999_983)
TIER_NAMES = ("cache", "fast_path", "router")


@dataclass(frozen=True)
class RoutingCacheSettings:
    """The thresholds of the three tiers (a preset, or a preset with knob overrides)."""

    frequency_threshold: float = 50
    entropy_threshold: float = 0.5
    confidence_threshold: float = 0.8
    cache_size: int = 1000
    cache_ttl_seconds: float = 60.0
    context_window_size: int = 4
    enabled: bool = True  # False: every token goes through the router, as in the dense model


PRESETS: dict[str, RoutingCacheSettings] = {
    "conservative": RoutingCacheSettings(frequency_threshold=200, entropy_threshold=0.2,
                                         confidence_threshold=0.95, cache_size=1000,
                                         cache_ttl_seconds=60.0, context_window_size=8),
    "balanced": RoutingCacheSettings(),
    "aggressive": RoutingCacheSettings(frequency_threshold=10, entropy_threshold=1.0,
                                       confidence_threshold=0.6, cache_size=4000,
                                       cache_ttl_seconds=300.0, context_window_size=2),
}
OFF = "off"  # the preset that routes every token through the router
OVERRIDES = ("frequency_threshold", "entropy_threshold", "confidence_threshold", "cache_size",
             "cache_ttl_seconds", "context_window_size")


def context_windows(idx: torch.Tensor, window: int, pad: int) -> torch.Tensor:
    """``(B, N, window + 1)``: for each position the ``window`` previous ids and its own id."""
    padded = torch.nn.functional.pad(idx, (window, 0), value=pad)
    return padded.unfold(1, window + 1, 1)


def window_keys(windows: torch.Tensor) -> torch.Tensor:
    """int64 keys of windows ``(..., W)``: two 31-bit polynomial hashes side by side."""
    parts = []
    for prime, base in zip(_PRIMES, _BASES, strict=True):
        h = torch.zeros(windows.shape[:-1], dtype=torch.int64)
        for j in range(windows.shape[-1]):
            h = (h * base + windows[..., j]) % prime
        parts.append(h)
    return parts[0] * (1 << 31) + parts[1]


@dataclass
class Lookup:
    hit: torch.Tensor  # (M,) bool
    expert: torch.Tensor  # (hits,) int64, for the hit queries in order
    gate: torch.Tensor  # (hits,) router probability stored with the entry


class RoutingCache:
    """One layer's verified, expiring, LRU-bounded map from context windows to (expert, gate).

    Storage is a set of tensors sorted by key (keys are unique): lookups are ``searchsorted``.
    """

    def __init__(self, capacity: int, ttl_seconds: float, width: int, *,
                 clock: Clock = time.monotonic, dtype: torch.dtype = torch.float32) -> None:
        if capacity < 0 or width < 1 or not ttl_seconds > 0:
            raise ValueError(f"need capacity >= 0, width >= 1 and ttl_seconds > 0; got "
                             f"{capacity}, {width}, {ttl_seconds}")
        self.capacity, self.ttl_seconds, self.width = capacity, ttl_seconds, width
        self.clock = clock
        self.dtype = dtype
        self.clear()

    def clear(self) -> None:
        self.keys = torch.empty(0, dtype=torch.int64)
        self.windows = torch.empty(0, self.width, dtype=torch.int64)
        self.expert = torch.empty(0, dtype=torch.int64)
        self.gate = torch.empty(0, dtype=self.dtype)
        self.inserted_at = torch.empty(0, dtype=torch.float64)
        self.last_used = torch.empty(0, dtype=torch.int64)
        self.serial = torch.empty(0, dtype=torch.int64)
        self._tick = 0
        self._next_serial = 0

    def __len__(self) -> int:
        return self.keys.numel()

    def _fields(self) -> tuple[str, ...]:
        return ("keys", "windows", "expert", "gate", "inserted_at", "last_used", "serial")

    def _keep(self, rows: torch.Tensor) -> None:
        for name in self._fields():
            setattr(self, name, getattr(self, name)[rows])

    def expire(self) -> None:
        """Drop entries at least ``ttl_seconds`` old on the clock."""
        if len(self):
            alive = self.clock() - self.inserted_at < self.ttl_seconds
            if not bool(alive.all()):
                self._keep(alive)

    def _check(self, keys: torch.Tensor, windows: torch.Tensor) -> None:
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise TypeError(f"cache keys must be a 1-D int64 tensor, got {keys.dtype} "
                            f"{tuple(keys.shape)}")
        if windows.dtype != torch.int64 or tuple(windows.shape) != (keys.numel(), self.width):
            raise ValueError(f"cache windows must be int64 of shape ({keys.numel()}, "
                             f"{self.width}), got {windows.dtype} {tuple(windows.shape)}")

    def lookup(self, keys: torch.Tensor, windows: torch.Tensor) -> Lookup:
        """Hits are queries whose key and whole window match a live entry; hits count as uses."""
        self._check(keys, windows)
        self.expire()
        if not len(self) or not keys.numel():
            hit = torch.zeros(keys.shape, dtype=torch.bool)
            return Lookup(hit, self.expert[:0], self.gate[:0])
        pos = torch.searchsorted(self.keys, keys).clamp_(max=len(self) - 1)
        hit = (self.keys[pos] == keys) & (self.windows[pos] == windows).all(dim=-1)
        rows = pos[hit]
        self._tick += 1
        self.last_used[rows] = self._tick
        return Lookup(hit, self.expert[rows], self.gate[rows])

    def insert(self, keys: torch.Tensor, windows: torch.Tensor, expert: torch.Tensor,
               gate: torch.Tensor) -> None:
        """Insert or overwrite entries, then evict least recently used ones beyond capacity.

        A key given twice keeps its last occurrence; an existing entry with the same key is
        replaced (whatever its window), restarting its lifetime.
        """
        self._check(keys, windows)
        if expert.shape != keys.shape or gate.shape != keys.shape:
            raise ValueError(f"expert {tuple(expert.shape)} and gate {tuple(gate.shape)} must "
                             f"match keys {tuple(keys.shape)}")
        if gate.numel() and not bool(((gate >= 0) & (gate <= 1)).all()):
            raise ValueError("cache gates must be probabilities in [0, 1] (NaN is rejected)")
        self.expire()
        m = keys.numel()
        if m == 0 or self.capacity == 0:
            return
        unique, inverse = torch.unique(keys, return_inverse=True)
        last = torch.full(unique.shape, -1, dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(m), reduce="amax")
        if len(self):
            pos = torch.searchsorted(self.keys, unique).clamp_(max=len(self) - 1)
            replaced = pos[self.keys[pos] == unique]
            keep = torch.ones(len(self), dtype=torch.bool)
            keep[replaced] = False
            self._keep(keep)
        self._tick += 1
        new = {
            "keys": unique, "windows": windows[last], "expert": expert[last],
            "gate": gate[last].to(self.dtype),
            "inserted_at": torch.full((unique.numel(),), float(self.clock()),
                                      dtype=torch.float64),
            "last_used": torch.full((unique.numel(),), self._tick, dtype=torch.int64),
            "serial": self._next_serial + last,
        }
        self._next_serial += m
        for name in self._fields():
            setattr(self, name, torch.cat([getattr(self, name), new[name]]))
        overflow = len(self) - self.capacity
        if overflow > 0:
            by_serial = torch.argsort(self.serial)
            lru = by_serial[torch.argsort(self.last_used[by_serial], stable=True)]
            keep = torch.ones(len(self), dtype=torch.bool)
            keep[lru[:overflow]] = False
            self._keep(keep)
        self._keep(torch.argsort(self.keys))


def route_rest(moe: MoEFeedForward, h: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor,
               by_router: Subset) -> Routing:
    """Top-1 routing of flat tokens ``h`` ``(T, d)``: ``expert``/``gate`` ``(T,)`` as given,
    except on the rows of ``by_router``, which are gathered, routed by ``moe`` and scattered
    back. With every row routed this is ``moe.route(h)`` itself (router probabilities kept)."""
    if by_router.size == by_router.total:
        return moe.route(h)
    routed = moe.route(by_router.gather(h))
    return Routing(expert=by_router.scatter(expert, routed.expert),
                   gate=by_router.scatter(gate, routed.gate),
                   probs=h.new_empty(0, moe.n_experts))


def routed_block(block: BKBlock, x: torch.Tensor, h: torch.Tensor,
                 routing: Routing) -> torch.Tensor:
    """``block`` on ``x`` ``(B, N, d)`` whose normalised tokens ``h = block.norm(x)`` ``(B N,
    d)`` go to the experts of ``routing``: the block's forward with its routing given."""
    b, n, d = x.shape
    f = block.moe.dispatch(h, routing)
    g = block.resolvent(block.potential(h).view(b, n, -1))
    return x + f.view(b, n, d) + block.mix(g)


class CachedRoutingLanguageModel(TechniqueModel):
    """The dense model whose top-1 routing goes through cache, fast path and router per layer.

    Parameters are exactly the dense model's. Calibration statistics (token counts and router
    probability sums per layer) are buffers saved with the weights, filled by training forward
    passes or :meth:`observe_batches`; the fast-path tables are rebuilt from them when needed.
    Knobs: a ``preset`` and optional overrides of its thresholds (``None``: the preset's).

    Forcing (:meth:`forced`): the skippable unit is the router evaluation of a (token, layer);
    ``keep`` is the share of them the router runs. The others get their routing for free: no
    cache, no lookup, no fast-path table, but an expert drawn uniformly at random (gate ``1 /
    n_experts``), drawn once per batch shape outside the timed call. Random experts, because
    the router's own choices could only be given for free by having run the model on that very
    input before; a uniform draw loads the experts evenly, as the balance loss trains the
    router to, and dispatch costs the same whichever expert a row goes to. ``"uniform"``: the
    router runs at evenly spaced positions (the same in every sequence and layer);
    ``"per_token"``: each (token, layer) independently with probability ``keep``.
    """

    KNOBS = (
        Knob("preset", str, "balanced", "threshold preset; 'off' routes every token through the "
             "router", choices=(*PRESETS, OFF), grid=(*PRESETS, OFF)),
        Knob("frequency_threshold", float, None, "fast path: fewest calibration occurrences "
             "(None: the preset's)", low=0, search=(1, 2000), log=True, optional=True),
        Knob("entropy_threshold", float, None, "fast path: largest router entropy in nats "
             "(None: the preset's)", low=0, search=(0.01, 1.4), optional=True),
        Knob("confidence_threshold", float, None, "cache a router decision when its "
             "probability is at least this (None: the preset's)", low=0, high=1,
             search=(0.3, 1.0), optional=True),
        Knob("cache_size", int, None, "entries per layer cache (None: the preset's)", low=0,
             search=(16, 100_000), log=True, optional=True),
        Knob("cache_ttl_seconds", float, None, "lifetime of a cache entry from insertion, > 0 "
             "(None: the preset's)", low=0, search=(1, 3600), log=True, optional=True),
        Knob("context_window_size", int, None, "previous tokens in the cache key (None: the "
             "preset's)", low=0, search=(0, 16), optional=True),
    )
    DECODES = False
    NO_DECODE_REASON = (
        "its routing comes from caches shared across calls (entries from earlier calls, "
        "expiring on a clock, evicted least recently used); a forward pass looks every "
        "position up before inserting any of its own decisions, while one position at a time "
        "would see the decisions of the positions before it, so the two differ whenever a "
        "context window repeats")

    def __init__(self, cfg: ModelConfig, *, preset: str = "balanced",
                 frequency_threshold: float | None = None,
                 entropy_threshold: float | None = None,
                 confidence_threshold: float | None = None, cache_size: int | None = None,
                 cache_ttl_seconds: float | None = None,
                 context_window_size: int | None = None, clock: Clock = time.monotonic,
                 calibrate_only: bool = True) -> None:
        super().__init__(cfg)
        overrides = {"frequency_threshold": frequency_threshold,
                     "entropy_threshold": entropy_threshold,
                     "confidence_threshold": confidence_threshold, "cache_size": cache_size,
                     "cache_ttl_seconds": cache_ttl_seconds,
                     "context_window_size": context_window_size}
        knobs = self.resolve_knobs({"preset": preset, **overrides})
        if knobs["cache_ttl_seconds"] is not None and not knobs["cache_ttl_seconds"] > 0:
            raise KnobError(f"knob cache_ttl_seconds: expected a number > 0, got "
                            f"{cache_ttl_seconds!r}")
        for name, value in knobs.items():
            setattr(self, name, value)
        if self.preset == OFF:
            self.settings = RoutingCacheSettings(enabled=False)
        else:
            self.settings = replace(PRESETS[self.preset], **{
                name: knobs[name] for name in OVERRIDES if knobs[name] is not None})
        self.calibrate_only = calibrate_only
        if calibrate_only:
            self.calibration_anchor = nn.Parameter(torch.zeros(()))
        # Gates are stored in float64, so that a hit returns the router's gate exactly whatever
        # the model's dtype (float32 and float64 values survive the round trip).
        self.caches = [RoutingCache(self.settings.cache_size, self.settings.cache_ttl_seconds,
                                    self.settings.context_window_size + 1, clock=clock,
                                    dtype=torch.float64)
                       for _ in range(cfg.n_layers)]
        self.register_buffer("token_counts", torch.zeros(cfg.vocab_size, dtype=torch.float64))
        self.register_buffer("prob_sums", torch.zeros(cfg.n_layers, cfg.vocab_size,
                                                       cfg.n_experts, dtype=torch.float64))
        self._fast_table: tuple[torch.Tensor, torch.Tensor] | None = None
        # (layer, tier) decisions taken by eval passes since the last reset; see routing_stats.
        self.tier_totals = torch.zeros(cfg.n_layers, len(TIER_NAMES), dtype=torch.int64)
        self.forcing: Forcing | None = None
        self._given: dict[tuple[int, int], GivenRouting] = {}

    # -- calibration -------------------------------------------------------------------------

    def reset_statistics(self) -> None:
        self.token_counts.zero_()
        self.prob_sums.zero_()
        self._fast_table = None

    def clear_caches(self) -> None:
        for cache in self.caches:
            cache.clear()

    @torch.no_grad()
    def observe_batches(self, batches: Iterable[torch.Tensor]) -> None:
        """Add the router statistics of ``batches`` (token ids ``(B, N)``) to the calibration."""
        was_training = self.training
        self.eval()
        for idx in batches:
            self.check_tokens(idx)
            self._forward(idx, None, tiers=False, observe=True)
        self.train(was_training)

    def token_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frequency ``(V,)``, router entropy ``(L, V)`` in nats, mean router probs ``(L, V, E)``).

        Entropy and probabilities are NaN for token ids never observed.
        """
        freq = self.token_counts
        mean_p = self.prob_sums / freq[None, :, None]
        entropy = -torch.special.xlogy(mean_p, mean_p).sum(dim=-1)
        return freq, entropy, mean_p

    def fast_path_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer and token id: (usual expert or -1 when not on the fast path, its gate)."""
        if self._fast_table is None:
            freq, entropy, mean_p = self.token_statistics()
            gate, expert = mean_p.nan_to_num(0.0).max(dim=-1)
            eligible = ((freq[None, :] > 0) & (freq[None, :] >= self.settings.frequency_threshold)
                        & (entropy <= self.settings.entropy_threshold))
            self._fast_table = (torch.where(eligible, expert, -1),
                                gate.to(self.head.weight.dtype))
        return self._fast_table

    # -- forward -----------------------------------------------------------------------------

    def route_tiers(self, layer: int, moe: MoEFeedForward, h: torch.Tensor,
                    tokens: torch.Tensor, keys: torch.Tensor, windows: torch.Tensor
                    ) -> tuple[Routing, torch.Tensor]:
        """Top-1 routing of flat tokens ``h`` ``(T, d)`` and the tier that decided each token."""
        cache = self.caches[layer]
        found = cache.lookup(keys, windows)
        fast_expert, fast_gate = (table[layer, tokens] for table in self.fast_path_table())
        hits = Subset.where(found.hit)
        expert = hits.scatter(fast_expert, found.expert)
        gate = hits.scatter(fast_gate.to(h.dtype), found.gate.to(h.dtype))
        tier = torch.where(found.hit, TIER_NAMES.index("cache"),
                           torch.where(fast_expert >= 0, TIER_NAMES.index("fast_path"),
                                       TIER_NAMES.index("router")))
        by_router = tier == TIER_NAMES.index("router")
        routing = route_rest(moe, h, expert, gate, Subset.where(by_router))
        confident = Subset.where(by_router & (routing.gate >= self.settings.confidence_threshold))
        cache.insert(*(confident.gather(t) for t in (keys, windows, routing.expert,
                                                     routing.gate)))
        return routing, tier

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        if not self.training:
            return self._forward(idx, targets, tiers=self.settings.enabled, observe=False)
        self.clear_caches()
        if not self.calibrate_only:
            return self._forward(idx, targets, tiers=False, observe=True)
        with torch.no_grad():
            out = self._forward(idx, targets, tiers=False, observe=True)
        if out.loss is not None:
            out.loss = out.loss + 0.0 * self.calibration_anchor
        return out

    def _forward(self, idx: torch.Tensor, targets: torch.Tensor | None, *, tiers: bool,
                 observe: bool) -> ModelOutput:
        b, n = idx.shape
        x = self.embed(idx)
        tokens = idx.reshape(-1)
        given = self.given_routing(b, n) if self.forcing is not None else None
        if tiers and given is None:
            windows = context_windows(idx, self.settings.context_window_size,
                                      pad=self.cfg.vocab_size).reshape(b * n, -1)
            keys = window_keys(windows)
            tier_counts = torch.zeros(len(TIER_NAMES), b * n, dtype=torch.int64)
        if observe:
            self.token_counts += torch.bincount(tokens, minlength=self.cfg.vocab_size)
            self._fast_table = None
        balance = x.new_zeros(())
        routes_given = 0
        for layer, block in enumerate(self.blocks):
            if given is None and not tiers and not observe and not self.training:
                x, _ = block(x)  # every token through the router: the dense block itself
                continue
            h = block.norm(x.reshape(b * n, -1))
            if given is not None:
                routing = route_rest(block.moe, h, given.expert[layer], given.gate.to(h.dtype),
                                     Subset.where(given.by_router[layer]))
            elif tiers:
                routing, tier = self.route_tiers(layer, block.moe, h, tokens, keys, windows)
                tier_counts[tier, torch.arange(b * n)] += 1
                self.tier_totals[layer] += torch.bincount(tier, minlength=len(TIER_NAMES))
            else:
                routing = block.moe.route(h)
                if self.training:  # as in the dense model, a training-only term
                    balance = balance + block.moe.balance_loss(routing)
                if observe:
                    self.prob_sums[layer].index_add_(0, tokens,
                                                     routing.probs.detach().to(torch.float64))
            x = routed_block(block, x, h, routing)
        layers = len(self.blocks)
        stats = {"layers_per_token": x.new_full((b, n), float(layers))}
        if given is not None:
            routes_given = given.routes_given
        elif tiers:
            for name, count in zip(TIER_NAMES, tier_counts, strict=True):
                stats[f"tier_{name}"] = (count / layers).to(x.dtype).view(b, n)
            routes_given = int(tier_counts[:TIER_NAMES.index("router")].sum())
        work = Work(token_layers=b * n * layers, expert_calls=b * n * layers,
                    positions=b * n * layers, routes_given=routes_given)
        aux = {"balance": self.cfg.balance_weight * balance / layers} if self.training else {}
        return self.finish(x, targets, aux, work, stats)

    # -- forcing -----------------------------------------------------------------------------

    def forced(self, forcing: Forcing) -> CachedRoutingLanguageModel:
        forced = copy.copy(self)
        forced.forcing = forcing
        forced._given = {}
        return forced

    def given_routing(self, b: int, n: int) -> GivenRouting:
        """The forcing's decisions for a ``(b, n)`` batch, per layer over its flat tokens; drawn
        once per batch shape."""
        if (b, n) not in self._given:
            forcing, layers, tokens = self.forcing, len(self.blocks), b * n
            generator = forcing.generator()
            if forcing.pattern == "uniform":  # positions i with floor((i+1) keep) > floor(i keep)
                position = torch.arange(n, dtype=torch.float64)
                routed = torch.floor((position + 1) * forcing.keep) > torch.floor(
                    position * forcing.keep)
                by_router = routed.repeat(b).expand(layers, tokens)
            else:
                by_router = torch.rand(layers, tokens, generator=generator) < forcing.keep
            expert = torch.randint(self.cfg.n_experts, (layers, tokens), generator=generator)
            self._given[b, n] = GivenRouting(
                by_router=by_router, expert=expert,
                gate=torch.full((tokens,), 1 / self.cfg.n_experts),
                routes_given=int((~by_router).sum()))
        return self._given[b, n]


@dataclass(frozen=True)
class GivenRouting:
    """A forced model's decisions for one batch shape: per layer, which flat tokens the router
    runs on and, for the others, their expert and gate."""

    by_router: torch.Tensor  # (L, T) bool
    expert: torch.Tensor  # (L, T) int64
    gate: torch.Tensor  # (T,)
    routes_given: int  # (token, layer) pairs not routed by the router
