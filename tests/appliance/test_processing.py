"""The message store's hourly roll-up follows every insert, update and delete of a minute."""

from __future__ import annotations

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
