"""The processing figures: the hourly roll-up follows every change of a minute; demo figures."""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.mail import msgstore, processing


def test_the_hourly_roll_up_follows_inserts_updates_and_deletes(appliance_root):
    msgstore.create()
    with msgstore.connect() as conn:
        for minute, received in ((3600, 5), (3660, 7), (7200, 1)):
            conn.execute(
                "INSERT INTO processing_minute (minute, received, bytes) VALUES (?, ?, ?) "
                "ON CONFLICT (minute) DO UPDATE SET received = received + excluded.received",
                (minute, received, received * 100),
            )
        conn.execute("UPDATE processing_minute SET received = 10 WHERE minute = 3600")
        conn.execute("DELETE FROM processing_minute WHERE minute = 7200")
        hours = conn.execute("SELECT hour, received, bytes FROM processing_hour").fetchall()

    assert [tuple(row) for row in hours] == [(3600, 17, 1200), (7200, 0, 0)]
    by_hour = processing.series(0, 10800, 3600)
    by_minute = processing.series(0, 10800, 60)
    assert sum(b.received for b in by_hour) == sum(b.received for b in by_minute) == 17


def test_the_demo_figures_have_a_few_viruses_and_rejections_like_the_demo_store(
    appliance_root,
):
    """The demo store holds viruses from the last days: the graphs must not say there were none."""
    msgstore.create()
    now = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
    processing.fill_demo_minutes(days=2, now=now)
    buckets = processing.series(int(now.timestamp()) - 2 * 86400, int(now.timestamp()), 86400)
    received = sum(b.received for b in buckets)
    virus = sum(b.virus for b in buckets)
    rejected = sum(b.rejected for b in buckets)
    assert 0.002 * received < virus < 0.01 * received
    assert 0.02 * received < rejected < 0.06 * received
