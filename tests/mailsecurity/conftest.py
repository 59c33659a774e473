"""A message store with rows of chosen ages, for the purge, planner and tracking tests.

Rows are aged from ``NOW``, and the test's clock is moved to ``NOW`` (tests/support/clock.py), so
the purge, the planner and the tracking search see the same moment as the rows, on any date.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.config.smtp import SmtpSettings
from appliance.config.store import write_smtp_settings
from appliance.mail import demo_store, msgstore
from appliance.system import paths
from tests.support.clock import Clock
from tests.support.smtp import NextHop

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY = 86_400


@dataclass
class MailData:
    """Writes rows straight into the test's message store, aged relative to NOW."""

    conn: sqlite3.Connection

    def store(self, name: str) -> int:
        return self.conn.execute("SELECT id FROM message_store WHERE name = ?", (name,)).fetchone()[
            0
        ]

    def _at(self, age_days: float) -> int:
        return int(NOW.timestamp() - age_days * DAY)

    def message(self, store: str, age_days: float, size: int = 2000) -> int:
        cursor = self.conn.execute(
            "INSERT INTO quarantined_message (store_id, received_at, message_id, sender,"
            " recipients, subject, size, verdict) VALUES (?, ?, '<m@x>', 's@x', 'r@x', 's', ?,"
            " 'spam')",
            (self.store(store), self._at(age_days), size),
        )
        self.conn.execute(
            "INSERT INTO quarantined_message_raw (message_id, raw) VALUES (?, ?)",
            (cursor.lastrowid, b"x" * size),
        )
        return int(cursor.lastrowid)

    def smtp(self, age_days: float) -> int:
        cursor = self.conn.execute(
            "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
            " VALUES (?, '203.0.113.5', 's@x', 'r@x', '250 2.0.0 Ok')",
            (self._at(age_days),),
        )
        return int(cursor.lastrowid)

    def tracking(
        self,
        age_days: float,
        *,
        sender: str = "s@example.com",
        recipient: str = "r@example.com",
        subject: str = "Hello",
        verdict: str = "clean",
        action: str = "delivered",
        size: int = 1000,
        quarantine_id: int | None = None,
        logged_at: int | None = None,
    ) -> int:
        cursor = self.conn.execute(
            "INSERT INTO tracking_log (logged_at, message_id, sender, recipient, subject, verdict,"
            " action, size, quarantine_id) VALUES (?, '<m@x>', ?, ?, ?, ?, ?, ?, ?)",
            (
                logged_at if logged_at is not None else self._at(age_days),
                sender, recipient, subject, verdict, action, size, quarantine_id,
            ),
        )  # fmt: skip
        return int(cursor.lastrowid)

    def commit(self) -> None:
        self.conn.commit()

    def ids(self, table: str) -> set[int]:
        return {row[0] for row in self.conn.execute(f"SELECT rowid FROM {table}")}


@pytest.fixture
def store_root(appliance_root: Path) -> Path:
    """An empty message store with the demo's four stores, and SMTP settings (logs 90 days)."""
    msgstore.create(appliance_root)
    demo_store.fill_demo(appliance_root, messages=0)
    paths.layout(appliance_root).cpe_dir.mkdir(parents=True, exist_ok=True)
    write_smtp_settings(SmtpSettings(), appliance_root)
    return appliance_root


@pytest.fixture
def mail(store_root: Path, clock: Clock) -> Iterator[MailData]:
    clock.travel(NOW)
    conn = sqlite3.connect(paths.layout(store_root).msgstore_db)
    conn.execute("PRAGMA foreign_keys = ON")
    yield MailData(conn)
    conn.close()


@pytest.fixture
def hop(store_root: Path) -> Iterator[NextHop]:
    """A loopback next hop (tests/support/smtp.py) the SMTP settings point at."""
    running = NextHop().start()
    write_smtp_settings(SmtpSettings(next_hop=running.address), store_root)
    yield running
    running.stop()
