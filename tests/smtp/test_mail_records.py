"""What the mail service writes to the message store: one transaction per record or batch."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.mail import mailrecords, msgstore
from appliance.mail.mailrecords import MailRecord
from tests.support.message_store import store_rows

NOW = 1_380_628_800  # 2013-10-01 12:00:00 UTC, a minute boundary


def record(**overrides: object) -> MailRecord:
    values: dict[str, object] = {
        "logged_at": NOW + 5,
        "client_ip": "203.0.113.7",
        "sender": "offers@promo-deals.test",
        "recipients": ("anna@example.com", "ben@example.com"),
        "message_id": "<1@promo-deals.test>",
        "subject": "You have won",
        "size": 1234,
        "verdict": "spam",
        "action": "quarantined",
        "response": "250 2.0.0 Ok: queued as 0A1B2C3D4E",
        "processing_ms": 7,
        "store_name": "Spam quarantine",
        "raw": b"Subject: You have won\r\n\r\nHi\r\n",
    }
    values.update(overrides)
    return MailRecord(**values)  # type: ignore[arg-type]


def test_a_quarantine_stores_the_message_and_logs_each_recipient(demo_appliance: Path) -> None:
    quarantine_id = mailrecords.mail_record(record())

    ((store, verdict, size, recipients),) = store_rows(
        "SELECT s.name, m.verdict, m.size, m.recipients FROM quarantined_message m"
        " JOIN message_store s ON s.id = m.store_id WHERE m.id = ?",
        quarantine_id,
    )
    assert (store, verdict, size) == ("Spam quarantine", "spam", 1234)
    assert recipients == "anna@example.com, ben@example.com"
    assert store_rows(
        "SELECT raw FROM quarantined_message_raw WHERE message_id = ?", quarantine_id
    ) == [(b"Subject: You have won\r\n\r\nHi\r\n",)]
    assert store_rows(
        "SELECT recipient, action, quarantine_id FROM tracking_log WHERE message_id = ?"
        " ORDER BY recipient",
        "<1@promo-deals.test>",
    ) == [
        ("anna@example.com", "quarantined", quarantine_id),
        ("ben@example.com", "quarantined", quarantine_id),
    ]
    assert len(store_rows("SELECT 1 FROM smtp_log WHERE response LIKE '%0A1B2C3D4E'")) == 2


def test_the_minute_figures_add_up_across_records(appliance_root: Path) -> None:
    msgstore.create()
    mailrecords.mail_record(record())
    mailrecords.mail_record(
        record(verdict="clean", action="delivered", store_name=None, raw=None, size=100)
    )
    mailrecords.mail_record(
        record(verdict="policy", action="rejected", store_name=None, raw=None, size=0)
    )
    mailrecords.mail_record(
        record(logged_at=NOW + 60, verdict="virus", store_name="Virus quarantine")
    )

    assert store_rows("SELECT * FROM processing_minute ORDER BY minute") == [
        (NOW, 3, 1, 1, 1, 0, 1, 1334, 21),
        (NOW + 60, 1, 0, 1, 0, 1, 0, 1234, 7),
    ]
    # A store the policy names but the database lacked is created rather than failing mail.
    assert store_rows(
        "SELECT retention_days FROM message_store WHERE name = 'Virus quarantine'"
    ) == [(mailrecords.DEFAULT_STORE_RETENTION_DAYS,)]


def test_a_quarantine_is_committed_with_full_sync(appliance_root: Path) -> None:
    msgstore.create()
    conn = mailrecords.connect_writer()
    try:
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == mailrecords.BUSY_TIMEOUT_MS
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        mailrecords.mail_record_many(conn, [record()])
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL

        # Log rows alone (the message is safe in the spool, or was refused) skip the fsync.
        delivered = record(verdict="clean", action="delivered", store_name=None, raw=None)
        mailrecords.mail_record_many(conn, [delivered])
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL

        mailrecords.mail_record_many(conn, [delivered, record()])
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        conn.close()


def test_a_batch_is_all_or_nothing(demo_appliance: Path) -> None:
    before = store_rows("SELECT count(*) FROM tracking_log")
    conn = mailrecords.connect_writer()
    try:
        with pytest.raises(sqlite3.IntegrityError):
            mailrecords.mail_record_many(conn, [record(), record(size=-1)])
    finally:
        conn.close()
    assert store_rows("SELECT count(*) FROM tracking_log") == before


def test_a_write_waits_for_another_process_holding_the_lock(demo_appliance: Path) -> None:
    purge = sqlite3.connect(demo_appliance / "var/lib/mailsec/msgstore/msgstore.db")
    purge.execute("BEGIN IMMEDIATE")
    purge.execute("DELETE FROM smtp_log WHERE id = 1")
    result: list[object] = []
    writer = threading.Thread(target=lambda: result.append(mailrecords.mail_record(record())))
    writer.start()
    writer.join(timeout=0.5)
    assert writer.is_alive()  # waiting, not failing
    purge.commit()
    purge.close()
    writer.join(timeout=10)
    assert result and isinstance(result[0], int)


@pytest.mark.parametrize(
    "overrides",
    [
        {"verdict": "ham"},
        {"action": "bounced"},
        {"store_name": None},
        {"raw": None},
        {"action": "delivered"},
        {"recipients": ()},
    ],
)
def test_inconsistent_records_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        record(**overrides)
