from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from bench.registry import Knob, Technique, register
from bk.adaptive.routing_cache import PRESETS, CachedRoutingLanguageModel, RoutingCacheSettings
from bk.model import ModelConfig

# Knob name -> type of the setting (a Bayesian search proposes floats for integer settings).
OVERRIDES = {"frequency_threshold": float, "entropy_threshold": float,
             "confidence_threshold": float, "cache_size": int, "cache_ttl_seconds": float,
             "context_window_size": int}


def settings_from_knobs(knobs: Mapping[str, Any]) -> RoutingCacheSettings:
    """The preset's settings, overridden by every threshold knob that is not ``None``."""
    preset = knobs["preset"]
    if preset == "off":
        return RoutingCacheSettings(enabled=False)
    if preset not in PRESETS:
        raise ValueError(f"unknown routing-cache preset {preset!r}; expected one of "
                         f"{sorted(PRESETS) + ['off']}")
    chosen = {name: kind(round(float(knobs[name])) if kind is int else float(knobs[name]))
              for name, kind in OVERRIDES.items() if knobs.get(name) is not None}
    return replace(PRESETS[preset], **chosen)


def build(config: ModelConfig, knobs: Mapping[str, Any]) -> CachedRoutingLanguageModel:
    return CachedRoutingLanguageModel(config, settings_from_knobs(knobs), calibrate_only=True)


register(Technique(
    name="routing_cache",
    summary="Top-1 routing through a verified per-layer cache, an offline fast path for "
            "frequent low-entropy tokens, then the router; weights are the dense model's.",
    build=build,
    knobs=(
        Knob("preset", "balanced", choices=("conservative", "balanced", "aggressive", "off"),
             grid=("conservative", "balanced", "aggressive", "off"),
             help="threshold preset; 'off' routes every token through the router"),
        Knob("frequency_threshold", None, low=1, high=2000, log=True,
             help="fast path: fewest calibration occurrences (None: the preset's)"),
        Knob("entropy_threshold", None, low=0.01, high=1.4,
             help="fast path: largest router entropy in nats (None: the preset's)"),
        Knob("confidence_threshold", None, low=0.3, high=1.0,
             help="cache a router decision when its probability is at least this"),
        Knob("cache_size", None, low=16, high=100_000, log=True,
             help="entries per layer cache (None: the preset's)"),
        Knob("cache_ttl_seconds", None, low=1, high=3600, log=True,
             help="lifetime of a cache entry from insertion (None: the preset's)"),
        Knob("context_window_size", None, low=0, high=16,
             help="previous tokens in the cache key (None: the preset's)"),
    ),
    # Not training: the fine-tuning steps stream train batches into the calibration statistics
    # with the dense weights left unchanged (calibrate_only).
    finetune_fraction=0.1,
    updates_weights=False,  # its fine-tuning steps only gather routing statistics
))
