"""The smoothed rate and time left of long work (lmi.progress): no jumps on bursts and stalls,
the same figure whatever the reporting frequency, and pauses not averaged in."""

from __future__ import annotations

import itertools

import pytest

from lmi.progress import RateMeter, seconds_left

MB = 1_000_000


def feed(meter: RateMeter, rates: list[tuple[float, float]], step: float) -> list[float]:
    """Report progress every ``step`` seconds through phases of (seconds, bytes per second)."""
    now, done, seen = 0.0, 0.0, []
    meter.update(0, now)
    for seconds, rate in rates:
        for _ in range(round(seconds / step)):
            now += step
            done += rate * step
            seen.append(meter.update(round(done), now))
    return seen


def test_a_steady_transfer_shows_its_rate():
    meter = RateMeter()
    assert feed(meter, [(10, 2 * MB)], 0.1)[-1] == pytest.approx(2 * MB, rel=0.01)


def test_the_time_left_does_not_jump_when_a_burst_ends():
    """The reported case: a fast start (buffers) then the line's real speed; the time left used
    to jump from 1 s to 14 s between two polls."""
    size, meter = 100 * MB, RateMeter()
    now, done, etas = 0.0, 0, []
    meter.update(0, now)
    for second in range(1, 60):
        now = float(second) / 2
        done = min(size, done + (20 * MB if second <= 2 else MB) // 2)
        etas.append(seconds_left(size, done, meter.update(done, now)))
    pairs = [(a, b) for a, b in itertools.pairwise(etas) if a and b]
    assert pairs and all(b <= a * 1.35 + 1 for a, b in pairs), etas


def test_the_rate_does_not_depend_on_how_often_progress_is_reported():
    phases = [(3, 10 * MB), (6, 2 * MB)]
    often = feed(RateMeter(), phases, 0.05)[-1]
    seldom = feed(RateMeter(), phases, 0.5)[-1]
    assert often == pytest.approx(seldom, rel=0.05)


def test_a_pause_before_a_resume_is_not_averaged_in():
    meter = RateMeter()
    feed(meter, [(10, 4 * MB)], 0.5)
    before = meter.rate
    meter.resume(40 * MB, 100.0)  # a retry's back-off of 90 s
    assert meter.update(42 * MB, 100.5) == pytest.approx(before, rel=0.01)


def test_the_time_left_is_unknown_before_any_rate():
    assert seconds_left(100, 0, 0.0) is None
    assert seconds_left(100, 40, 20.0) == 3
