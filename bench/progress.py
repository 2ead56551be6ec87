"""Progress a person can plan by: what runs now, how far it is, and how long the rest will take.

A job is a list of phases known up front (train the dense model, fine-tune each technique,
measure each one, ...), each with a number of units (steps, timed rounds, batches) and a kind.
Time left is estimated per kind from the seconds per unit seen so far in this job (the dense
model's training steps price the fine-tuning steps, each measured technique the next one); a
phase whose kind has not run yet is priced like another kind when it says how (``priced_like``:
a timed round is about two forward passes, a forward pass about a third of a training step),
else shown as unknown. On a terminal one status line is redrawn in place; elsewhere
(a pipe, a CI log, ``quiet``) nothing is drawn until the closing summary.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Phase:
    name: str
    units: int
    kind: str  # phases of one kind share a rate: "train", "measure", "evaluate", ...
    unit_name: str = "steps"
    done: int = 0
    seconds: float = 0.0
    skipped: bool = False  # a cached result: nothing ran
    resumed: int = 0  # units an earlier, interrupted job did: counted as done, not priced
    # Until a phase of this kind has run: one unit costs ``factor`` units of kind ``like``.
    priced_like: tuple[str, float] | None = None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def interactive(stream: TextIO) -> bool:
    """Redraw a status line only on a terminal and outside CI."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


@dataclass
class Progress:
    """The phases of one job and their progress; see the module docstring."""

    phases: list[Phase]
    title: str = "bk-bench"
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    live: bool | None = None  # None: decide by the stream
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = interactive(self.stream)
        self.started = self.clock()
        self._current: Phase | None = None
        self._phase_start = self.started
        self._last_draw = -1.0

    # -- estimates --------------------------------------------------------------------------

    def rate(self, kind: str) -> float | None:
        """Seconds per unit of ``kind`` seen so far (finished and running phases)."""
        seconds = units = 0.0
        for phase in self.phases:
            if phase.kind == kind and not phase.skipped and phase.done > phase.resumed:
                seconds += phase.seconds
                units += phase.done - phase.resumed
        return seconds / units if units else None

    def phase_left(self, phase: Phase) -> float | None:
        if phase.skipped:
            return 0.0
        rate = self.rate(phase.kind)
        if rate is None and phase.priced_like is not None:
            like, factor = phase.priced_like
            rate = None if self.rate(like) is None else factor * self.rate(like)
        return None if rate is None else rate * (phase.units - phase.done)

    def job_left(self) -> float | None:
        """Seconds left in the whole job; None while some phase cannot be priced yet."""
        total = 0.0
        for phase in self.phases:
            left = self.phase_left(phase)
            if left is None:
                return None
            total += left
        return total

    # -- reporting --------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[Callable[[int], None]]:
        """Run the phase called ``name``; the body calls the yielded function after each unit
        (with the number of units done since the last call, 1 by default). A phase marked
        skipped up front (a cache entry expected) that runs after all starts from zero."""
        phase = self._find(name)
        if phase.skipped:
            phase.skipped, phase.done = False, 0
        self._current, self._phase_start = phase, self.clock()

        def advance(n: int = 1) -> None:
            phase.done = min(phase.units, phase.done + n)
            phase.seconds = self.clock() - self._phase_start
            self._draw()

        self._draw(force=True)
        try:
            yield advance
        finally:
            phase.seconds = self.clock() - self._phase_start
            self._current = None

    def resume(self, name: str, units: int) -> None:
        """``units`` of phase ``name`` were done by an earlier, interrupted job (resumed from
        its checkpoint): they count as done but do not price the remaining units."""
        phase = self._find(name)
        phase.resumed = min(phase.units, phase.resumed + units)
        phase.done = min(phase.units, phase.done + units)

    def skip(self, name: str) -> None:
        """Mark a phase as served from a cache: nothing runs, no time is left in it."""
        phase = self._find(name)
        phase.skipped, phase.done = True, phase.units

    def status(self) -> str:
        phase = self._current
        if phase is None:
            return f"{self.title}: {format_duration(self.clock() - self.started)} elapsed"
        index = self.phases.index(phase) + 1
        return (f"{self.title} [{index}/{len(self.phases)}] {phase.name}: {phase.done}/"
                f"{phase.units} {phase.unit_name}, {format_duration(self.phase_left(phase))} "
                f"left in phase, {format_duration(self.job_left())} left in job")

    def summary(self) -> str:
        ran = [p for p in self.phases if not p.skipped]
        cached = len(self.phases) - len(ran)
        text = (f"{self.title}: finished in {format_duration(self.clock() - self.started)} "
                f"({len(ran)} phases ran")
        return text + (f", {cached} served from the cache)" if cached else ")")

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(self.summary() + "\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not self.live or (not force and now - self._last_draw < 0.5):
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r\033[K" + self.status()[:width - 1])
        self.stream.flush()

    def _find(self, name: str) -> Phase:
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise ValueError(f"no phase {name!r} in this job; phases: "
                         f"{', '.join(p.name for p in self.phases)}")


