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
and softmax. Everything else (norm, expert, BK mixing) runs for every token, so ``Work`` is
the dense model's. The tiers act in eval mode only: training routes every token through the
router (the gates must receive gradient) and records the calibration statistics; any training
step clears the caches, since the router may have changed. With ``calibrate_only`` the training
loop only streams train-split batches into the statistics: the forward pass runs without
gradient and the objective is ``ce + 0 * calibration_anchor``, so no dense weight receives a
gradient and AdamW (which skips parameters without one, weight decay included) leaves them
exactly as they were; the perplexity change then measures the tiers alone.

Hashing, lookup, insertion and eviction are tensor operations over all tokens of a layer at
once (``searchsorted`` on a sorted key array, batched eviction); there is no per-token Python
loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bk.model import LanguageModel, ModelConfig, ModelOutput, Work
from bk.moe import MoEFeedForward, Routing

Clock = Callable[[], float]

# Two polynomial hashes modulo primes below 2^31; bases below 2^20 keep every product in int64.
_PRIMES = (2_147_483_647, 2_147_483_629)
_BASES = (1_000_003, 999_983)
TIER_NAMES = ("cache", "fast_path", "router")


@dataclass(frozen=True)
class RoutingCacheSettings:
    frequency_threshold: float = 50
    entropy_threshold: float = 0.5
    confidence_threshold: float = 0.8
    cache_size: int = 1000
    cache_ttl_seconds: float = 60.0
    context_window_size: int = 4
    enabled: bool = True  # False: every token goes through the router, as in the dense model

    def __post_init__(self) -> None:
        problems = []
        for name in ("frequency_threshold", "entropy_threshold", "confidence_threshold",
                     "cache_ttl_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value):
                problems.append(f"{name} must be a number, got {value!r}")
        for name in ("cache_size", "context_window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if not problems and not self.cache_ttl_seconds > 0:
            problems.append(f"cache_ttl_seconds must be > 0, got {self.cache_ttl_seconds}")
        if problems:
            raise ValueError("invalid RoutingCacheSettings: " + "; ".join(problems))


PRESETS: dict[str, RoutingCacheSettings] = {
    "conservative": RoutingCacheSettings(frequency_threshold=200, entropy_threshold=0.2,
                                         confidence_threshold=0.95, cache_size=1000,
                                         cache_ttl_seconds=60.0, context_window_size=8),
    "balanced": RoutingCacheSettings(),
    "aggressive": RoutingCacheSettings(frequency_threshold=10, entropy_threshold=1.0,
                                       confidence_threshold=0.6, cache_size=4000,
                                       cache_ttl_seconds=300.0, context_window_size=2),
}


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


class CachedRoutingLanguageModel(LanguageModel):
    """The dense model whose top-1 routing goes through cache, fast path and router per layer.

    Parameters are exactly the dense model's. Calibration statistics (token counts and router
    probability sums per layer) are buffers saved with the weights, filled by training forward
    passes or :meth:`observe_batches`; the fast-path tables are rebuilt from them when needed.
    """

    def __init__(self, cfg: ModelConfig, settings: RoutingCacheSettings | None = None, *,
                 clock: Clock = time.monotonic, calibrate_only: bool = False) -> None:
        super().__init__(cfg)
        self.calibrate_only = calibrate_only
        if calibrate_only:
            self.calibration_anchor = nn.Parameter(torch.zeros(()))
        self.settings = settings or RoutingCacheSettings()
        self.caches = [RoutingCache(self.settings.cache_size, self.settings.cache_ttl_seconds,
                                    self.settings.context_window_size + 1, clock=clock)
                       for _ in range(cfg.n_layers)]
        self.register_buffer("token_counts", torch.zeros(cfg.vocab_size, dtype=torch.float64))
        self.register_buffer("prob_sums", torch.zeros(cfg.n_layers, cfg.vocab_size,
                                                       cfg.n_experts, dtype=torch.float64))
        self._fast_table: tuple[torch.Tensor, torch.Tensor] | None = None
        # (layer, tier) decisions taken by eval passes since the last reset; see routing_stats.
        self.tier_totals = torch.zeros(cfg.n_layers, len(TIER_NAMES), dtype=torch.int64)

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
        t = h.shape[0]
        expert = torch.empty(t, dtype=torch.int64)
        gate = h.new_empty(t)
        tier = torch.full((t,), TIER_NAMES.index("router"), dtype=torch.int64)
        cache = self.caches[layer]
        found = cache.lookup(keys, windows)
        expert[found.hit] = found.expert
        gate[found.hit] = found.gate.to(h.dtype)
        tier[found.hit] = TIER_NAMES.index("cache")
        fast_expert, fast_gate = (table[layer, tokens] for table in self.fast_path_table())
        fast = ~found.hit & (fast_expert >= 0)
        expert[fast] = fast_expert[fast]
        gate[fast] = fast_gate[fast]
        tier[fast] = TIER_NAMES.index("fast_path")
        rest = (tier == TIER_NAMES.index("router")).nonzero().squeeze(1)
        if rest.numel() == t:
            routed = moe.route(h)
        else:
            routed = moe.route(h.index_select(0, rest))
        expert[rest] = routed.expert
        gate[rest] = routed.gate
        confident = rest[routed.gate >= self.settings.confidence_threshold]
        confident_gate = routed.gate[routed.gate >= self.settings.confidence_threshold]
        cache.insert(keys[confident], windows[confident], expert[confident], confident_gate)
        return Routing(expert=expert, gate=gate, probs=h.new_empty(0, moe.n_experts)), tier

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        self.check_tokens(idx)
        tiers = self.settings.enabled and not self.training
        if not self.training:
            return self._forward(idx, targets, tiers=tiers, observe=False)
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
        if tiers:
            windows = context_windows(idx, self.settings.context_window_size,
                                      pad=self.cfg.vocab_size).reshape(b * n, -1)
            keys = window_keys(windows)
            tier_counts = torch.zeros(len(TIER_NAMES), b * n)
        if observe:
            self.token_counts += torch.bincount(tokens, minlength=self.cfg.vocab_size)
            self._fast_table = None
        balance = x.new_zeros(())
        for layer, block in enumerate(self.blocks):
            h = block.norm(x.reshape(b * n, -1))
            if tiers:
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
            f = block.moe.dispatch(h, routing)
            g = block.resolvent(block.potential(h).view(b, n, -1))
            x = x + f.view(b, n, -1) + block.mix(g)
        layers = len(self.blocks)
        work = Work(token_layers=b * n * layers, expert_calls=b * n * layers,
                    positions=b * n * layers)
        stats = {"layers_per_token": x.new_full((b, n), float(layers))}
        if tiers:
            for name, count in zip(TIER_NAMES, tier_counts, strict=True):
                stats[f"tier_{name}"] = (count / layers).to(x.dtype).view(b, n)
        aux = {"balance": self.cfg.balance_weight * balance / layers}
        return self.finish(x, targets, aux, work, stats)
