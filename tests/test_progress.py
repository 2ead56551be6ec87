"""Progress a person can plan by (bench/progress.py), driven by a fake clock."""

import io

import pytest

from bench.progress import Phase, Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def job(clock, live=False, stream=None):
    phases = [Phase("train dense", 100, "train"), Phase("fine-tune act", 30, "train"),
              Phase("measure act", 10, "measure", "rounds", priced_like=("train", 0.5))]
    return Progress(phases, stream=stream or io.StringIO(), live=live, clock=clock)


def test_time_left_comes_from_the_rate_seen_so_far_and_prices_later_phases_alike():
    clock = Clock()
    progress = job(clock)
    assert progress.job_left() is None  # nothing has run: no rate to price anything by
    with progress.phase("train dense") as advance:
        for _ in range(40):
            clock.now += 2.0
            advance()
        assert progress.phase_left(progress.phases[0]) == pytest.approx(60 * 2.0)
        # 60 dense steps, 30 fine-tuning steps at 2 s, 10 rounds priced at half a step.
        assert progress.job_left() == pytest.approx(120 + 60 + 10)
        assert "[1/3] train dense: 40/100 steps, 2m00s left in phase, 3m10s left in job" in (
            progress.status())


def test_a_cached_phase_costs_nothing_and_a_kind_that_ran_prices_itself():
    clock = Clock()
    progress = job(clock)
    with progress.phase("train dense") as advance:
        clock.now += 100.0
        advance(100)
    progress.skip("fine-tune act")
    with progress.phase("measure act") as advance:
        clock.now += 3.0
        advance()
        assert progress.job_left() == pytest.approx(9 * 3.0)
    assert progress.summary() == ("bk-bench: finished in 1m43s (2 phases ran, 1 served from "
                                  "the cache)")


def test_nothing_is_drawn_off_a_terminal_but_the_closing_summary():
    clock, stream = Clock(), io.StringIO()
    progress = job(clock, stream=stream)
    with progress.phase("train dense") as advance:
        clock.now += 1
        advance()
    progress.close()
    assert stream.getvalue() == "bk-bench: finished in 1s (3 phases ran)\n"


def test_on_a_terminal_one_status_line_is_redrawn():
    clock, stream = Clock(), io.StringIO()
    progress = job(clock, live=True, stream=stream)
    with progress.phase("train dense") as advance:
        for _ in range(3):
            clock.now += 1
            advance()
    assert stream.getvalue().count("\r") == 4 and "\n" not in stream.getvalue()


def test_an_unknown_phase_is_named_in_the_error():
    with pytest.raises(ValueError, match="no phase 'x'"):
        job(Clock()).skip("x")


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0.4, "0s"), (59, "59s"), (61, "1m01s"),
                                           (3600 + 120, "1h02m")])
def test_durations_read_as_hours_minutes_and_seconds(seconds, text):
    assert format_duration(seconds) == text
