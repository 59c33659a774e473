"""The license, the update feed and the graphs on the calendar's awkward days.

The clock (tests/support/clock.py) is moved to a leap day and to New Year's Eve, a minute before
midnight, and then over it: the code under test reads that clock through its ordinary calls, so
these tests prove what the appliance does on those days, whatever day the suite runs.
"""

from __future__ import annotations

import io
import itertools
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from appliance.firmware.demo_feed import init_demo_updates
from appliance.firmware.license import install_license, license_status, sign_license
from appliance.mail import processing
from appliance.system import paths
from appliance.system.facts import read_firmware_release
from home.graphs import RANGES, bucket_starts, processing_graphs
from tests.support.clock import Clock
from tests.upgrades.bundles import new_vendor
from upgrades import selectors, services

LEAP_DAY_EVENING = datetime(2028, 2, 29, 23, 59, 0, tzinfo=UTC)
NEW_YEARS_EVE = datetime(2027, 12, 31, 23, 59, 0, tzinfo=UTC)


@pytest.fixture
def demo_updates(demo_appliance: Path, settings, clock: Clock) -> Path:
    """The demo vendor, feed and license, made a minute before midnight on a leap day."""
    clock.travel(LEAP_DAY_EVENING)
    init_demo_updates(Path(settings.VAR_DIR), demo_appliance, out=io.StringIO())
    return demo_appliance


def test_a_license_made_on_29_february_runs_to_28_february_and_ends_at_its_midnight(
    demo_updates: Path, clock: Clock
) -> None:
    status = license_status()
    assert status.license is not None and status.entitled
    assert status.license.updates_until == date(2029, 2, 28)  # there is no 29 February 2029

    clock.travel(datetime(2029, 2, 28, 23, 59, 30, tzinfo=UTC))
    assert license_status().entitled  # the last day is included

    clock.shift(timedelta(minutes=1))  # 1 March 2029, 00:00:30
    ended = license_status()
    assert ended.valid and not ended.entitled
    assert ended.reason == "The update entitlement ended on 2029-02-28."


def test_an_entitlement_that_ends_on_new_years_eve_ends_with_the_year(
    demo_appliance: Path, clock: Clock
) -> None:
    vendor = new_vendor()
    serial = read_firmware_release(demo_appliance).get("SERIAL", "")
    data = sign_license(
        vendor.private, customer="Example Corp", serial=serial, updates_until=date(2027, 12, 31)
    )
    install_license(data, demo_appliance, keys=[vendor.public])
    clock.travel(NEW_YEARS_EVE)
    assert license_status(keys=[vendor.public]).entitled

    clock.shift(timedelta(minutes=2))  # 2028-01-01 00:01
    status = license_status(keys=[vendor.public])
    assert not status.entitled
    assert "ended on 2027-12-31" in status.reason


@pytest.mark.django_db
def test_the_feed_check_over_leap_midnight_offers_the_update_and_is_due_an_hour_later(
    demo_updates: Path, clock: Clock
) -> None:
    check = services.update_check(trigger="user", user="admin")
    assert check.ok, check.error
    assert check.checked_at == selectors.last_check().checked_at
    assert check.checked_at.date() == date(2028, 2, 29)
    assert selectors.license_view().entitled
    assert not selectors.check_overdue()

    clock.shift(timedelta(minutes=30))  # 1 March, 00:29
    assert not selectors.check_overdue()
    clock.shift(timedelta(minutes=31))  # 1 March, 01:00: more than an hour since the check
    assert selectors.check_overdue()
    again = services.update_check(trigger="schedule", user="")
    assert again.ok and again.checked_at.date() == date(2028, 3, 1)


def _minutes_total(root: Path, since: int, until: int) -> int:
    conn = sqlite3.connect(paths.layout(root).msgstore_db)
    try:
        row = conn.execute(
            "SELECT COALESCE(SUM(received), 0) FROM processing_minute"
            " WHERE minute >= ? AND minute < ?",
            (since, until),
        ).fetchone()
    finally:
        conn.close()
    return int(row[0])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "midnight",
    [
        pytest.param(datetime(2028, 3, 1, tzinfo=UTC), id="after-29-february"),
        pytest.param(datetime(2028, 1, 1, tzinfo=UTC), id="new-year"),
    ],
)
@pytest.mark.parametrize("range_key", sorted(RANGES))
def test_the_graphs_over_midnight_count_every_minute_once(
    demo_appliance: Path, clock: Clock, midnight: datetime, range_key: str
) -> None:
    """Two days of minutes up to 30 minutes past the midnight: no bucket lost or counted twice."""
    now = midnight + timedelta(minutes=30)
    clock.travel(now)
    processing.fill_demo_minutes(demo_appliance, days=2)  # reads the moved clock
    rng = RANGES[range_key]
    starts = bucket_starts(rng, now.timestamp())
    assert all(b - a == rng.bucket_seconds for a, b in itertools.pairwise(starts))
    assert starts[0] <= now.timestamp() - rng.seconds + rng.bucket_seconds

    graphs = processing_graphs(range_key)  # "now" from the clock
    assert not graphs.error
    messages = next(g for g in graphs.graphs if g.key == "messages")
    assert messages.starts == starts
    received = messages.series[0]
    assert received.label == "Messages"
    # The counts per interval add up to the stored minutes.
    size = rng.bucket_seconds
    total = sum(v or 0 for v in received.values)
    stored = _minutes_total(demo_appliance, starts[0], starts[-1] + size)
    assert stored > 0
    assert round(total) == stored
    # The buckets on both sides of midnight are there.
    assert int(midnight.timestamp()) // size * size in starts
    assert int(midnight.timestamp()) - size in starts
