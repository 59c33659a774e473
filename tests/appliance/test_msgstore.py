"""The message store: its format version, totals, stores and demo data."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.mail import demo_store, msgstore
from appliance.system.errors import ApplianceError, ApplianceNotInitialized
from appliance.system.paths import layout

NOW = datetime(2013, 10, 1, 12, 0, tzinfo=UTC)


def _rows(root: Path) -> list[tuple[object, ...]]:
    conn = msgstore.connect(root, readonly=True)
    try:
        rows: list[tuple[object, ...]] = []
        for table in (
            "message_store",
            "quarantined_message",
            "quarantined_message_raw",
            "smtp_log",
            "tracking_log",
        ):
            rows += [tuple(row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1")]
        return rows
    finally:
        conn.close()


def test_it_records_format_2_8_0(appliance_root: Path) -> None:
    msgstore.create()
    assert msgstore.FORMAT_VERSION == "2.8.0"
    assert msgstore.format_version() == "2.8.0"


def test_it_keeps_its_own_database_in_wal_mode(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=10, now=NOW)
    assert layout().msgstore_db.parent == layout().msgstore_dir
    conn = msgstore.connect()
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_create_is_idempotent_and_keeps_data(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=25, now=NOW)
    msgstore.create()
    msgstore.create()
    assert msgstore.totals().messages == 25
    assert msgstore.format_version() == "2.8.0"


def test_create_refuses_a_store_in_another_format(appliance_root: Path) -> None:
    msgstore.create()
    conn = msgstore.connect()
    with conn:
        conn.execute("UPDATE meta SET value = '2.8.1' WHERE key = 'format_version'")
    conn.close()
    with pytest.raises(ApplianceError):
        msgstore.create()


def test_without_a_store_totals_is_none_and_connect_refuses(appliance_root: Path) -> None:
    assert msgstore.totals() is None
    with pytest.raises(ApplianceNotInitialized):
        msgstore.connect()
    with pytest.raises(ApplianceNotInitialized):
        msgstore.format_version()
    assert not layout().msgstore_db.exists()  # connect never creates it


def test_a_readonly_connection_cannot_write(appliance_root: Path) -> None:
    msgstore.create()
    conn = msgstore.connect(readonly=True)
    try:
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM smtp_log")
    finally:
        conn.close()


def _recipients() -> int:
    """All recipients of the stored messages: the tracking log has a row for each."""
    conn = msgstore.connect(readonly=True)
    try:
        rows = conn.execute("SELECT recipients FROM quarantined_message").fetchall()
    finally:
        conn.close()
    return sum(len(value.split(", ")) for (value,) in rows)


def test_totals_count_rows_and_bytes_on_disk(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=120, now=NOW)
    totals = msgstore.totals()
    assert totals is not None
    recipients = _recipients()
    assert recipients > 120  # a few messages have two or three recipients
    assert (totals.messages, totals.smtp_log, totals.tracking_log) == (120, 120, recipients)
    db = layout().msgstore_db
    wal = db.with_name(db.name + "-wal")
    on_disk = db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    assert totals.bytes == on_disk > 0


def test_list_stores_counts_messages_and_sums_their_sizes(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=300, now=NOW)
    stores = msgstore.list_stores()
    assert [(s.name, s.retention_days) for s in stores] == [
        (name, days) for name, days, _, _ in demo_store.DEMO_STORES
    ]
    conn = msgstore.connect(readonly=True)
    try:
        for store in stores:
            count, total = conn.execute(
                "SELECT count(*), coalesce(sum(length(r.raw)), 0)"
                " FROM quarantined_message AS m"
                " JOIN quarantined_message_raw AS r ON r.message_id = m.id"
                " WHERE m.store_id = ?",
                (store.id,),
            ).fetchone()
            assert (store.message_count, store.bytes) == (count, total)
    finally:
        conn.close()
    assert sum(store.message_count for store in stores) == 300
    assert all(store.message_count > 0 for store in stores)


def test_demo_messages_are_within_their_stores_retention(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=300, now=NOW)
    now_ts = int(NOW.timestamp())
    conn = msgstore.connect(readonly=True)
    try:
        rows = conn.execute(
            "SELECT s.retention_days, min(m.received_at), max(m.received_at)"
            " FROM quarantined_message AS m JOIN message_store AS s ON s.id = m.store_id"
            " GROUP BY s.id"
        ).fetchall()
        verdicts = {row[0] for row in conn.execute("SELECT DISTINCT verdict FROM tracking_log")}
        actions = {row[0] for row in conn.execute("SELECT DISTINCT action FROM tracking_log")}
    finally:
        conn.close()
    for retention_days, oldest, newest in rows:
        assert now_ts - retention_days * 86400 <= oldest <= newest <= now_ts
    assert verdicts == set(msgstore.VERDICTS)
    assert actions <= set(msgstore.ACTIONS) and "delivered" in actions


def test_raw_messages_are_rfc5322_with_the_recorded_headers(appliance_root: Path) -> None:
    from email import message_from_bytes

    demo_store.fill_demo(messages=40, now=NOW)
    conn = msgstore.connect(readonly=True)
    try:
        rows = conn.execute(
            "SELECT m.sender, m.subject, m.message_id, m.size, r.raw FROM quarantined_message m"
            " JOIN quarantined_message_raw r ON r.message_id = m.id"
        ).fetchall()
    finally:
        conn.close()
    for sender, subject, message_id, size, raw in rows:
        parsed = message_from_bytes(raw)
        assert (parsed["From"], parsed["Subject"], parsed["Message-ID"]) == (
            sender,
            subject,
            message_id,
        )
        assert size == len(raw)
        assert 300 <= size <= 8192


def test_fill_demo_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    demo_store.fill_demo(first, messages=150, seed=7, now=NOW)
    demo_store.fill_demo(second, messages=150, seed=7, now=NOW)
    demo_store.fill_demo(other, messages=150, seed=8, now=NOW)
    assert _rows(first) == _rows(second)
    assert _rows(first) != _rows(other)


def test_a_second_fill_adds_to_the_store(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=40, now=NOW)
    demo_store.fill_demo(messages=10, seed=1, now=NOW)
    totals = msgstore.totals()
    assert (totals.messages, totals.smtp_log, totals.tracking_log) == (50, 50, _recipients())
    assert len(msgstore.list_stores()) == len(demo_store.DEMO_STORES)


def test_the_indexes_later_features_need_exist_after_a_fill(appliance_root: Path) -> None:
    demo_store.fill_demo(messages=30, now=NOW)
    conn = msgstore.connect(readonly=True)
    try:
        names = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")
        }
        plan = " ".join(
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM quarantined_message"
                " WHERE store_id = 1 AND received_at < 0"
            )
        )
    finally:
        conn.close()
    assert {
        "quarantined_message_store_received",
        "smtp_log_logged_at",
        "tracking_log_logged_at",
        "tracking_log_sender",
        "tracking_log_recipient",
        "tracking_log_verdict",
    } <= names
    assert "quarantined_message_store_received" in plan
