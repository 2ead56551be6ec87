"""The technique contract: what every adaptive model in ``bk.adaptive`` is and promises.

A technique model is a :class:`TechniqueModel`, a subclass of the dense
:class:`bk.model.LanguageModel`. The harness relies on exactly this:

* **Built from** a :class:`~bk.model.ModelConfig` and keyword knobs. Every knob is declared in
  the class's ``KNOBS`` (name, type, valid range, default, search grid); :meth:`from_knobs`
  validates every value against its declaration before anything is built, so an integer knob
  rejects ``2.5`` and a bad value is named with its knob. Every parameter the dense model has
  keeps its name, so a technique starts from the trained dense weights.
* **forward(idx, targets=None)** returns a :class:`~bk.model.ModelOutput`: ``logits`` ``(B, N,
  V)``; with targets, ``ce`` (mean next-token cross-entropy) and ``loss = ce + sum(aux)`` where
  ``aux`` names each weighted auxiliary training term (MoE balance, ponder cost, ...; terms
  that exist only in training are absent in eval mode); ``work``, the :class:`~bk.model.Work`
  that really ran; ``stats``, per-token ``(B, N)`` statistics, at least ``layers_per_token``.
  Logits at position ``i`` depend on tokens ``0..i`` only, decisions included.
* **Decoding**: ``init_state``/``step`` compute exactly what ``forward`` computes, one position
  at a time; a technique that cannot decode sets ``DECODES = False`` and both raise
  ``NotImplementedError`` saying why (``NO_DECODE_REASON``).
* **schedule(progress)** runs before every fine-tuning step, ``progress`` in ``[0, 1]``.
* **forced(forcing)**: the same model running its own skip path with its decisions given for
  free (no predictor, no exit heads), at a given keep rate: the technique's ceiling. ``None``
  when the technique makes no decisions.
* **AXES** (optional): for a model that composes several ways of cutting work, each axis's
  name and the knob values that switch it off, so that the harness can measure what each axis
  contributes (the model with that axis off must equal the model without it).

Adding a technique is one model file here, one registration in ``bench/techniques/`` and its
tests; ``docs/techniques.md`` walks through an example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import torch

from bk.model import DecodeState, LanguageModel, ModelConfig

KnobValue = int | float | str | bool | None


class KnobError(ValueError):
    """A knob value that does not fit its declaration; the message names the knob."""


@dataclass(frozen=True)
class Knob:
    """A setting of a technique: its type, valid range and default, and where a search looks.

    ``low``/``high`` bound the valid values (inclusive; ``None``: unbounded). ``choices`` lists
    the valid values of a categorical knob. ``grid`` is what a grid search tries; ``search``
    the range a Bayesian search samples (``log``: log-uniformly), by default ``(low, high)``.
    ``optional`` knobs accept ``None``, meaning "the model's own default".
    """

    name: str
    kind: type
    default: KnobValue
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[KnobValue, ...] = ()
    grid: tuple[KnobValue, ...] = ()
    search: tuple[float, float] | None = None
    log: bool = False
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (int, float, str, bool):
            raise TypeError(f"knob {self.name}: kind must be int, float, str or bool, got "
                            f"{self.kind!r}")
        for value in (self.default, *self.grid):
            if value is not None or not self.optional:
                self.parse(value)

    def describe(self) -> str:
        """The valid values, in words: ``"a float in [0.5, 1]"``."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        text = what[self.kind]
        if self.low is not None and self.high is not None:
            text += f" in [{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            text += f" >= {self.low:g}"
        elif self.high is not None:
            text += f" <= {self.high:g}"
        return text + (" or none" if self.optional else "")

    @property
    def search_range(self) -> tuple[float, float] | None:
        if self.search is not None:
            return self.search
        if self.low is not None and self.high is not None:
            return (self.low, self.high)
        return None

    def parse(self, value: Any) -> KnobValue:
        """``value`` (a Python value or command-line text) as this knob's type, validated."""
        if isinstance(value, str) and self.kind is not str:
            value = value_from_text(value)
        if value is None:
            if self.optional:
                return None
            self._fail(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                self._fail(value)
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self._fail(value)
            if isinstance(value, float):
                if not value.is_integer():
                    self._fail(value)
                value = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self._fail(value)
            value = float(value)
            if not math.isfinite(value):
                self._fail(value)
        elif not isinstance(value, str):
            self._fail(value)
        if self.choices and value not in self.choices:
            self._fail(value)
        if self.kind in (int, float) and ((self.low is not None and value < self.low)
                                          or (self.high is not None and value > self.high)):
            self._fail(value)
        return value

    def _fail(self, value: Any) -> None:
        raise KnobError(f"knob {self.name}: expected {self.describe()}, got {value!r}")


def value_from_text(text: str) -> Any:
    """A value typed on a command line or read from a table: none/null, true/false, an integer,
    a number, else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class Forcing:
    """Decisions given for free: the fraction ``keep`` of a technique's skippable work runs.

    ``pattern`` ``"uniform"``: every sequence skips alike, in the technique's most structured
    form (for depth: every token runs the same layers); ``"per_token"``: each token decides
    independently at random with probability ``keep``, at the same mean rate. ``seed`` fixes the
    random pattern.
    """

    keep: float
    pattern: Literal["uniform", "per_token"] = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"Forcing.keep must lie in (0, 1], got {self.keep!r}")
        if self.pattern not in ("uniform", "per_token"):
            raise ValueError(f"Forcing.pattern must be 'uniform' or 'per_token', got "
                             f"{self.pattern!r}")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class TechniqueModel(LanguageModel):
    """Base class of every technique model; see the module docstring for the contract."""

    KNOBS: ClassVar[tuple[Knob, ...]] = ()
    AXES: ClassVar[Mapping[str, Mapping[str, KnobValue]]] = {}
    DECODES: ClassVar[bool] = True
    NO_DECODE_REASON: ClassVar[str] = ""

    @classmethod
    def knob(cls, name: str) -> Knob:
        for knob in cls.KNOBS:
            if knob.name == name:
                return knob
        raise KnobError(f"{cls.__name__} has no knob {name!r}; its knobs are "
                        f"{', '.join(k.name for k in cls.KNOBS) or 'none'}")

    @classmethod
    def resolve_knobs(cls, knobs: Mapping[str, Any] | None = None) -> dict[str, KnobValue]:
        """Every knob's value: the defaults overridden by ``knobs``, each validated."""
        values = {k.name: k.default for k in cls.KNOBS}
        for name, value in (knobs or {}).items():
            values[name] = cls.knob(name).parse(value)
        return values

    @classmethod
    def from_knobs(cls, cfg: ModelConfig, knobs: Mapping[str, Any] | None = None) -> Self:
        return cls(cfg, **cls.resolve_knobs(knobs))

    def knob_values(self) -> dict[str, KnobValue]:
        """The knobs this model was built with (as attributes of the same names)."""
        return {k.name: getattr(self, k.name) for k in self.KNOBS}

    def schedule(self, progress: float) -> None:
        """Called before every fine-tuning step; ``progress`` in [0, 1]. Nothing by default."""
        if not 0 <= progress <= 1:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")

    def forced(self, forcing: Forcing) -> TechniqueModel | None:
        """This model with its decisions given for free (its ceiling); ``None`` if it makes
        no decisions."""
        return None

    def init_state(self, batch_size: int) -> DecodeState:
        if not self.DECODES:
            raise NotImplementedError(f"{type(self).__name__} does not decode incrementally: "
                                      f"{self.NO_DECODE_REASON}; use forward()")
        return super().init_state(batch_size)

    def step(self, tokens: torch.Tensor, state: DecodeState
             ) -> tuple[torch.Tensor, DecodeState]:
        if not self.DECODES:
            raise NotImplementedError(f"{type(self).__name__} does not decode incrementally: "
                                      f"{self.NO_DECODE_REASON}; use forward()")
        return super().step(tokens, state)
