"""How fast long work goes and how long it has left, smoothed so the figure does not jump.

A rate measured over the last moment swings with every stall and burst (a buffer filling, a
resumed transfer, a slow disk flush), and the time left computed from it jumps from 1 s to 14 s
and back. :class:`RateMeter` keeps an exponentially weighted moving average of the rate with a
time constant (not a per-sample weight), so it behaves the same whether progress is reported
ten times a second or once: a sudden change moves the figure by about 63% per time constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone

DEFAULT_TIME_CONSTANT = 5.0  # seconds


@dataclass
class RateMeter:
    """Units per second of one piece of work; feed it ``update(done, now)`` with a monotonic
    clock. The first interval sets the rate; later ones blend in by elapsed time."""

    time_constant: float = DEFAULT_TIME_CONSTANT
    rate: float = 0.0
    _last: tuple[float, int] | None = field(default=None, repr=False)
    _measured: bool = field(default=False, repr=False)

    def update(self, done: int, now: float) -> float:
        """Record ``done`` units at ``now`` and return the smoothed rate."""
        if self._last is None:
            self._last = (now, done)
            return self.rate
        then, before = self._last
        elapsed = now - then
        if elapsed <= 0:
            return self.rate
        self._last = (now, done)
        instant = max(0.0, (done - before) / elapsed)
        if not self._measured:
            self.rate, self._measured = instant, True
        else:
            weight = 1.0 - math.exp(-elapsed / self.time_constant)
            self.rate += weight * (instant - self.rate)
        return self.rate

    def resume(self, done: int, now: float) -> None:
        """Work goes on after a pause (a retry's back-off, a reconnect): the pause is not
        averaged in as a rate of zero; the next interval counts from here."""
        self._last = (now, done)


def seconds_left(total: int, done: int, rate: float) -> int | None:
    """Time left at ``rate``; None while the rate is unknown."""
    if rate <= 0:
        return None
    return max(0, round((total - done) / rate))


def percent(done: int, total: int, *, finished: bool = False) -> float:
    """``done`` of ``total`` as 0-100 (100 once ``finished``; 0 while the total is unknown)."""
    if finished:
        return 100.0
    if total <= 0:
        return 0.0
    return min(100.0, 100.0 * done / total)


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    """From ``start`` to ``end``, or to now while ``end`` is None; None before a start."""
    if start is None:
        return None
    return max(0.0, ((end or timezone.now()) - start).total_seconds())
