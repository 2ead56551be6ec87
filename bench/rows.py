"""One result row: everything bk-bench measured of one technique at one setting.

Measurement (``Bench.measure``, ``bench.measure.compare``), ``bk-bench run`` (results.json and
results.csv), the baseline records, the tuner's trial figures and the report all carry this one
type. A row is checked when it is made, so a malformed one never exists: every figure is finite,
the interquartile range contains the median, and the quality delta is the one its two
perplexities give. ``Row.from_dict`` reads the JSON form back (``Row.to_dict``), naming the file
and the field of a malformed value.

The figures, realised against the technique's reference (the dense model trained as long):

* wall: ``wall_speedup`` is the median per-round ratio ``t_reference / t_candidate`` (paired,
  one thread), ``wall_q1``/``wall_q3`` its quartiles over ``rounds`` rounds, ``t_*_s`` the
  median seconds per call, ``noise_warning`` set when the spread is too wide to trust;
* counted: ``flops_speedup`` (torch's FLOP counter), ``work_ratio`` = executed FLOPs of the work
  that really ran (``bk.model.Work.flops``), candidate over reference, and the raw work counts;
* quality: test perplexities of reference and candidate, ``quality_delta = ppl_c / ppl_r - 1``,
  and ``counts``: within the quality budget;
* ceilings (``bench.ceilings``): the wall speedup of the technique's own skip path with its
  decisions given for free (``TechniqueModel.forced``), at the keep rate whose executed work
  matches the realised ``work_ratio``, in both forcing patterns. From them: ``ideal = 1 /
  work_ratio``, implementation overhead ``1 - ceiling / ideal`` and decision cost ``1 - wall /
  ceiling``. ``decisions`` is ``"learned"`` when the technique decides (ceilings measured),
  ``"none"`` when it makes no decisions (its ceiling is its realised speedup) and null when no
  ceiling was measured;
* ``stats``: per-token statistics averaged over the workload (``mean_<name>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from bk.technique import KnobValue

PATTERNS = ("uniform", "per_token")
DECISIONS = ("learned", "none")
# Written by ``Row.to_dict`` for readers, recomputed (never read) by ``Row.from_dict``.
DERIVED = ("noisy", "ideal", "reference_bits_per_token", "candidate_bits_per_token",
           *(f"{figure}_{pattern}" for figure in ("overhead", "decision_cost")
             for pattern in PATTERNS))


class RowError(ValueError):
    """A row with a missing, malformed or inconsistent figure; the message names it."""


@dataclass(frozen=True)
class Row:
    technique: str
    scale: str
    wall_speedup: float
    knobs: Mapping[str, KnobValue] = field(default_factory=dict)
    wall_q1: float | None = None
    wall_q3: float | None = None
    rounds: int | None = None
    noise_warning: str | None = None
    t_reference_s: float | None = None
    t_candidate_s: float | None = None
    flops_speedup: float | None = None
    work_ratio: float | None = None  # executed FLOPs (Work.flops), candidate / reference
    token_layers: int | None = None
    expert_calls: int | None = None
    positions: int | None = None
    reference_perplexity: float | None = None
    candidate_perplexity: float | None = None
    quality_delta: float | None = None
    counts: bool | None = None  # within the quality budget; None: quality not measured
    decisions: str | None = None
    keep_uniform: float | None = None
    keep_per_token: float | None = None
    ceiling_uniform: float | None = None
    ceiling_per_token: float | None = None
    stats: Mapping[str, float] = field(default_factory=dict)  # mean_<name> -> value

    def __post_init__(self) -> None:
        what = f"technique {self.technique!r}"
        if not isinstance(self.technique, str) or not self.technique:
            raise RowError(f"technique is {self.technique!r}; expected a non-empty name")
        if not isinstance(self.scale, str) or not self.scale:
            raise RowError(f"{what} scale is {self.scale!r}; expected a scale name")
        _number(self.wall_speedup, f"{what} wall_speedup", positive=True, optional=False)
        for name in ("wall_q1", "wall_q3", "quality_delta"):
            _number(getattr(self, name), f"{what} {name}")
        for name in ("t_reference_s", "t_candidate_s", "flops_speedup", "work_ratio",
                     "reference_perplexity", "candidate_perplexity", "ceiling_uniform",
                     "ceiling_per_token"):
            _number(getattr(self, name), f"{what} {name}", positive=True)
        for name in ("keep_uniform", "keep_per_token"):
            value = getattr(self, name)
            _number(value, f"{what} {name}")
            if value is not None and not 0 < value <= 1:
                raise RowError(f"{what} {name} is {value}; expected a keep rate in (0, 1]")
        for name in ("rounds", "token_layers", "expert_calls", "positions"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise RowError(f"{what} {name} is {value!r}; expected a count (integer >= 0)")
        if self.q1_q3_misplaced():
            raise RowError(f"{what}: the interquartile range [{self.wall_q1}, {self.wall_q3}] "
                           f"does not contain the median wall speedup {self.wall_speedup}")
        if self.noise_warning is not None and not isinstance(self.noise_warning, str):
            raise RowError(f"{what} noise_warning is {self.noise_warning!r}; expected text")
        if self.counts is not None and not isinstance(self.counts, bool):
            raise RowError(f"{what} counts is {self.counts!r}; expected true, false or null")
        if self.decisions is not None and self.decisions not in DECISIONS:
            raise RowError(f"{what} decisions is {self.decisions!r}; expected one of "
                           f"{', '.join(DECISIONS)} or null")
        if not isinstance(self.knobs, Mapping) or not all(isinstance(k, str) for k in self.knobs):
            raise RowError(f"{what} knobs is {self.knobs!r}; expected an object of knob values")
        if not isinstance(self.stats, Mapping):
            raise RowError(f"{what} stats is {self.stats!r}; expected an object")
        for name, value in self.stats.items():
            if not name.startswith("mean_"):
                raise RowError(f"{what} statistic {name!r} is not named mean_<statistic>")
            _number(value, f"{what} {name}", optional=False)
        self._check_quality(what)

    def q1_q3_misplaced(self) -> bool:
        q1, q3 = self.wall_q1, self.wall_q3
        return (q1 is not None and q1 > self.wall_speedup) or (
            q3 is not None and q3 < self.wall_speedup)

    def _check_quality(self, what: str) -> None:
        ref, cand = self.reference_perplexity, self.candidate_perplexity
        if ref is None or cand is None:
            return
        expected = cand / ref - 1
        if self.quality_delta is None or not math.isclose(self.quality_delta, expected,
                                                          rel_tol=1e-9, abs_tol=1e-12):
            raise RowError(f"{what} quality_delta is {self.quality_delta}, but its perplexities "
                           f"{cand} / {ref} give {expected}")

    # -- derived figures --------------------------------------------------------------------

    @property
    def noisy(self) -> bool:
        return self.noise_warning is not None

    @property
    def reference_bits_per_token(self) -> float | None:
        return None if self.reference_perplexity is None else math.log2(self.reference_perplexity)

    @property
    def candidate_bits_per_token(self) -> float | None:
        return None if self.candidate_perplexity is None else math.log2(self.candidate_perplexity)

    @property
    def ideal(self) -> float | None:
        """The speedup the skipped work promises: dense FLOPs / executed FLOPs."""
        return None if self.work_ratio is None else 1 / self.work_ratio

    def ceiling(self, pattern: str) -> float | None:
        return getattr(self, f"ceiling_{_pattern(pattern)}")

    def keep(self, pattern: str) -> float | None:
        return getattr(self, f"keep_{_pattern(pattern)}")

    def overhead(self, pattern: str) -> float | None:
        """Implementation overhead: ``1 - ceiling / ideal``."""
        ceiling, ideal = self.ceiling(pattern), self.ideal
        return None if ceiling is None or ideal is None else 1 - ceiling / ideal

    def decision_cost(self, pattern: str) -> float | None:
        """What deciding costs: ``1 - realised / ceiling``."""
        ceiling = self.ceiling(pattern)
        return None if ceiling is None else 1 - self.wall_speedup / ceiling

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field (``stats`` flattened to its ``mean_*`` keys) and, for
        readers, the derived figures, which ``from_dict`` recomputes instead of reading."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stats"}
        data["knobs"] = dict(self.knobs)
        data.update(self.stats)
        data.update(self.derived())
        return data

    def derived(self) -> dict[str, Any]:
        """The figures ``DERIVED`` names, computed from the fields."""
        data: dict[str, Any] = {"noisy": self.noisy, "ideal": self.ideal,
                                "reference_bits_per_token": self.reference_bits_per_token,
                                "candidate_bits_per_token": self.candidate_bits_per_token}
        for pattern in PATTERNS:
            data[f"overhead_{pattern}"] = self.overhead(pattern)
            data[f"decision_cost_{pattern}"] = self.decision_cost(pattern)
        return data

    def flat(self) -> dict[str, Any]:
        """One line of a CSV table: ``to_dict`` with the knobs as ``name=value`` text."""
        return {**self.to_dict(), "knobs": knobs_text(self.knobs)}

    @classmethod
    def from_dict(cls, data: Any, where: str, scale: str | None = None) -> Row:
        """A row from its JSON form; ``scale`` is the default for rows that carry none (results
        written before rows carried their scale). Other keys (the ``DERIVED`` figures, columns
        older versions wrote) are not read. A malformed row raises ``RowError`` naming ``where``,
        the technique and the field."""
        if not isinstance(data, Mapping):
            raise RowError(f"{where}: a row is {type(data).__name__}, expected an object")
        names = {f.name for f in fields(cls)} - {"stats"}
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("scale", scale)
        knobs = values.get("knobs")
        if knobs is None or isinstance(knobs, str):
            values["knobs"] = _knobs_from_text(knobs or "", where)
        values["stats"] = {k: v for k, v in data.items() if k.startswith("mean_")}
        for name in ("technique", "wall_speedup"):
            if values.get(name) is None:
                raise RowError(f"{where}: a row lacks its {name!r}")
        try:
            return cls(**values)
        except RowError as err:
            raise RowError(f"{where}: {err}") from None


def _pattern(pattern: str) -> str:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    return pattern


def _number(value: Any, what: str, *, positive: bool = False, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RowError(f"{what} is {value!r}; expected a finite number"
                       + (" or null" if optional else ""))
    if positive and value <= 0:
        raise RowError(f"{what} is {value}; expected a positive number")


def knobs_text(knobs: Mapping[str, KnobValue]) -> str:
    """``name=value, ...`` of the knobs that are set."""
    return ", ".join(f"{k}={v}" for k, v in knobs.items() if v is not None)


def _knobs_from_text(text: str, where: str) -> dict[str, KnobValue]:
    """The knobs of a results file written before rows held them as an object."""
    from bk.technique import value_from_text  # imports torch: only for such old files

    knobs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise RowError(f"{where}: knobs {text!r} are not name=value pairs")
        knobs[name.strip()] = value_from_text(value)
    return knobs


T = TypeVar("T")


def pareto_front(points: Sequence[T],
                 figures: Callable[[T], tuple[float, float]] = lambda p: p) -> list[int]:
    """Indices of the points no other point dominates in (speedup: higher is better, quality
    delta: lower is better), ordered by speedup, then quality delta, ascending.

    ``q`` dominates ``p`` when it is at least as fast and at most as degraded, and strictly
    better in one of the two; equal points do not dominate each other. Along the front, a step
    up in speedup costs quality.
    """
    pairs = [figures(p) for p in points]

    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])

    front = [i for i, p in enumerate(pairs) if not any(dominates(q, p) for q in pairs)]
    return sorted(front, key=lambda i: pairs[i])
