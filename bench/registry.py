"""The registry of techniques: what `run`, `baseline`, `tune`, the asv suites and the cumulative
figure iterate over. A technique is added by a module in ``bench/techniques/`` that calls
``register``; nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bk.model import ModelConfig
from bk.technique import Knob, TechniqueModel

Value = float | int | str | bool | None


@dataclass(frozen=True)
class Technique:
    """How to build a candidate model, its knobs, and how to train it from the reference.

    ``build(config, knobs)`` returns a model whose parameters shared with the dense model have the
    same names, so it starts from the trained reference's weights and is fine-tuned for
    ``finetune_fraction`` of the reference's training steps. ``schedule(model, progress)`` runs
    before each fine-tuning step with progress in [0, 1] (for example a sparsity schedule).
    ``updates_weights=False`` marks a technique whose fine-tuning steps only calibrate (they
    change no weight), so its quality reference is the dense model itself, not the dense model
    trained for the same steps. ``axes`` names, for a technique that composes several ways of
    cutting work, the knob values that switch each one off (``TechniqueModel.AXES``): a run
    measures the technique with each axis off in turn, which is that axis's contribution.
    """

    name: str
    summary: str
    build: Callable[[ModelConfig, Mapping[str, Any]], nn.Module] | None = None
    knobs: tuple[Knob, ...] = ()
    reference: str = "dense"
    finetune_fraction: float = 0.3
    schedule: Callable[[nn.Module, float], None] | None = None
    updates_weights: bool = True
    model: type[TechniqueModel] | None = None  # the contract (bk/technique.py)
    axes: Mapping[str, Mapping[str, Value]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is not None:  # knobs, build and schedule come from the model class
            object.__setattr__(self, "knobs", self.model.KNOBS)
            object.__setattr__(self, "axes", self.model.AXES)
            object.__setattr__(self, "build", self.model.from_knobs)
            object.__setattr__(self, "schedule", lambda m, progress: m.schedule(progress))

    def defaults(self) -> dict[str, Value]:
        return {k.name: k.default for k in self.knobs}

    def resolve(self, knobs: Mapping[str, Any] | None = None) -> dict[str, Value]:
        """Defaults overridden by ``knobs``, each validated; a bad name or value raises
        ``ValueError`` naming the knob."""
        if self.model is not None:
            return self.model.resolve_knobs(knobs)
        values = self.defaults()
        for name, value in (knobs or {}).items():
            if name not in values:
                raise ValueError(f"technique {self.name!r} has no knob {name!r}; its knobs are "
                                 f"{sorted(values) or 'none'}")
            values[name] = value
        return values

    def make(self, config: ModelConfig, knobs: Mapping[str, Any] | None = None) -> nn.Module:
        return self.build(config, self.resolve(knobs))


_REGISTRY: dict[str, Technique] = {}
REFERENCE = "dense"


def register(technique: Technique) -> Technique:
    if technique.name in _REGISTRY:
        raise ValueError(f"technique {technique.name!r} is registered twice")
    _REGISTRY[technique.name] = technique
    return technique


def _discover() -> None:
    import bench.techniques as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def techniques() -> dict[str, Technique]:
    """All registered techniques by name, the dense reference first."""
    if not _REGISTRY:
        _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[0] != REFERENCE, kv[0])))


def get(name: str) -> Technique:
    registered = techniques()
    if name not in registered:
        raise ValueError(f"unknown technique {name!r}; registered: {', '.join(registered)}")
    return registered[name]
