"""Processing figures per minute (the message store's ``processing_minute`` table).

The mail service adds to the current minute's row as it handles each message; the processing
graphs read them back in buckets. A bucket is a plain SUM over its minutes, answered from the
table's primary key, so a 30-day graph reads its ~43,000 minutes in one indexed range scan and
hands the browser a few hundred points, never tens of thousands.
"""

from __future__ import annotations

import math
import random
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.mail import msgstore
from appliance.system.errors import MalformedApplianceFile

COUNTERS = ("received", "delivered", "quarantined", "rejected", "virus", "spam")


@dataclass(frozen=True)
class ProcessingBucket:
    """The sums of one bucket of minutes, starting at ``start`` (epoch seconds, UTC)."""

    start: int
    received: int
    delivered: int
    quarantined: int
    rejected: int
    virus: int
    spam: int
    bytes: int
    processing_ms: int

    @property
    def average_ms(self) -> float | None:
        """Average processing time per message, None for a bucket without mail."""
        return self.processing_ms / self.received if self.received else None


def series(
    since: int, until: int, bucket_seconds: int, root: Path | None = None
) -> list[ProcessingBucket]:
    """Buckets of ``bucket_seconds`` covering [since, until), only those that saw mail.

    Bucket starts are aligned to multiples of ``bucket_seconds`` so that successive refreshes
    of a graph put the same minutes in the same bucket.
    """
    if bucket_seconds < 60 or bucket_seconds % 60:
        raise ValueError("bucket_seconds must be a whole number of minutes")
    # Whole hours come from the hourly roll-up the triggers keep: 24 times fewer rows to sum.
    table, column = (
        ("processing_hour", "hour")
        if bucket_seconds % 3600 == 0
        else ("processing_minute", "minute")
    )
    conn = msgstore.connect(root, readonly=True)
    try:
        rows = conn.execute(
            f"""
            SELECT ({column} / :b) * :b AS start, SUM(received), SUM(delivered),
                   SUM(quarantined), SUM(rejected), SUM(virus), SUM(spam), SUM(bytes),
                   SUM(processing_ms)
            FROM {table}
            WHERE {column} >= :since AND {column} < :until
            GROUP BY start
            ORDER BY start
            """,  # noqa: S608 - table and column are one of two constants above
            {"b": bucket_seconds, "since": since, "until": until},
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise MalformedApplianceFile(f"processing figures cannot be read: {exc}") from exc
    finally:
        conn.close()
    return [ProcessingBucket(*row) for row in rows]


def totals(windows: list[tuple[int, int]], root: Path | None = None) -> list[ProcessingBucket]:
    """The sums over each window [since, until), as one bucket starting at ``since``.

    Windows on whole hours read the hourly roll-up (720 rows for 30 days), others the minutes;
    all on one connection.
    """
    conn = msgstore.connect(root, readonly=True)
    result = []
    try:
        for since, until in windows:
            table, column = (
                ("processing_hour", "hour")
                if since % 3600 == 0 and until % 3600 == 0
                else ("processing_minute", "minute")
            )
            row = conn.execute(
                f"""
                SELECT coalesce(SUM(received), 0), coalesce(SUM(delivered), 0),
                       coalesce(SUM(quarantined), 0), coalesce(SUM(rejected), 0),
                       coalesce(SUM(virus), 0), coalesce(SUM(spam), 0), coalesce(SUM(bytes), 0),
                       coalesce(SUM(processing_ms), 0)
                FROM {table}
                WHERE {column} >= :since AND {column} < :until
                """,  # noqa: S608 - table and column are one of two constants above
                {"since": since, "until": until},
            ).fetchone()
            result.append(ProcessingBucket(since, *row))
    except sqlite3.DatabaseError as exc:
        raise MalformedApplianceFile(f"processing figures cannot be read: {exc}") from exc
    finally:
        conn.close()
    return result


def fill_demo_minutes(
    root: Path | None = None, *, days: int = 30, now: datetime | None = None, seed: int = 2880
) -> int:
    """Give a demo appliance 30 days of per-minute figures with a working-day rhythm.

    Only the graphs read these rows; the demo's quarantined messages are generated separately,
    so the two agree in shape (mostly spam, a little virus) rather than row for row.
    """
    rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
    end = int((now or datetime.now(tz=UTC)).timestamp()) // 60 * 60
    start = end - days * 86400
    rows = []
    for minute in range(start, end, 60):
        hour = (minute % 86400) / 3600
        weekday = (minute // 86400 + 3) % 7  # 1970-01-01 was a Thursday
        working = 0.35 if weekday >= 5 else 1.0
        rhythm = 0.25 + 0.75 * math.exp(-(((hour - 13.5) / 4.5) ** 2))
        received = max(0, int(rng.gauss(40 * rhythm * working, 4)))
        if received == 0:
            continue
        spam = int(received * rng.uniform(0.45, 0.6))
        # Rounded at random, not down: with about 40 messages a minute a share of 0-2% is less
        # than one message, and truncating it gave a month without a single virus.
        virus = int(received * rng.uniform(0.0, 0.01) + rng.random())
        rejected = int(received * rng.uniform(0.02, 0.06) + rng.random())
        quarantined = spam + virus
        delivered = max(0, received - quarantined - rejected)
        average_size = 6000 + int(rng.expovariate(1 / 9000))
        rows.append(
            (
                minute,
                received,
                delivered,
                quarantined,
                rejected,
                virus,
                spam,
                average_size * received,
                int(received * rng.uniform(35, 90)),
            )
        )
    conn = msgstore.connect(root)
    try:
        with conn:
            conn.executemany(
                # Not INSERT OR REPLACE: a replace deletes without firing the delete trigger,
                # which would leave the hourly roll-up counting the old row too.
                "INSERT INTO processing_minute (minute, received, delivered, quarantined, "
                "rejected, virus, spam, bytes, processing_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (minute) DO UPDATE SET received = excluded.received, "
                "delivered = excluded.delivered, quarantined = excluded.quarantined, "
                "rejected = excluded.rejected, virus = excluded.virus, spam = excluded.spam, "
                "bytes = excluded.bytes, processing_ms = excluded.processing_ms",
                rows,
            )
    finally:
        conn.close()
    return len(rows)
