"""The one way tests control time: the ``clock`` fixture (time-machine underneath).

A test that builds dated data (messages of a given age, a license that runs out, a backup from
last week, graph minutes) moves the test process's clock to a moment it chose, and ages its data
from that moment; the product code under test reads that moment through its ordinary calls
(``timezone.now()``, ``datetime.now()``, ``date.today()``, ``time.time()``). The clock keeps
ticking from there (``tick=True``) so timeouts and "started before finished" still hold;
``time.monotonic()`` is never moved, so waits and deadlines stay real.

Code in another process (a Celery worker, the SMTP service, a browser) reads the real clock, so a
test that hands work to one ages its data from the real ``clock.now()`` instead of a fixed date.

The whole suite, every process included, can be run at another date with libfaketime
(``scripts/test-on-date``): that is how the suite proves it passes on any date.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import time_machine


class Clock:
    """The test process's clock: moved with ``travel``/``shift``, read with ``now``."""

    def __init__(self) -> None:
        self._traveller: time_machine.travel | None = None
        self._coordinates: time_machine.Traveller | None = None

    def now(self) -> datetime:
        """The current moment (UTC) as the product sees it."""
        return datetime.now(UTC)

    def travel(self, moment: datetime, *, tick: bool = True) -> datetime:
        """Move the clock to ``moment`` (an aware datetime); it ticks on from there by default."""
        if moment.tzinfo is None:
            raise ValueError("the test clock takes aware datetimes (tzinfo=UTC)")
        self.stop()
        self._traveller = time_machine.travel(moment, tick=tick)
        self._coordinates = self._traveller.start()
        return moment

    def shift(self, delta: timedelta) -> datetime:
        """Move the clock by ``delta`` (forwards or back) from where it is now."""
        if self._coordinates is None:
            return self.travel(self.now() + delta)
        self._coordinates.shift(delta)
        return self.now()

    def stop(self) -> None:
        if self._traveller is not None:
            self._traveller.stop()
            self._traveller = None
            self._coordinates = None


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The test's clock, back to the real time when the test ends."""
    test_clock = Clock()
    yield test_clock
    test_clock.stop()
