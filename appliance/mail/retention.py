"""Retention of the message store: what it keeps, and how old what it holds is.

The guide's "Reclaiming disk space" lowers three retentions: per message store (Mail Security >
Policy Objects > Message Stores), the SMTP log (SMTP > Configuration > Maintenance) and the
message tracking log (Mail Security > Policy > Message Tracking / Reporting).
Lowering them only helps if the expired rows are then deleted and the file actually gets
smaller: that is the purge's (:mod:`appliance.mail.purge`); the age distribution here tells
beforehand how much a retention frees.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.mail import msgstore
from appliance.system.paths import layout

# Longest retention the console accepts: ten years. Retention values are whole days.
MAX_RETENTION_DAYS = 3650

# The tables a purge deletes from; the store's other tables are never touched.
# message_body is 2.8.1's quarantined_message_raw; a store has one or the other.
PURGED_TABLES = (
    "quarantined_message",
    "quarantined_message_raw",
    "message_body",
    "smtp_log",
    "tracking_log",
)


# --- Retention settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoreRetention:
    """One message store's retention."""

    id: int
    name: str
    retention_days: int


@dataclass(frozen=True)
class RetentionSettings:
    """Every retention a purge honours, read from the appliance at one moment."""

    stores: tuple[StoreRetention, ...]
    smtp_log_days: int
    tracking_log_days: int

    def store(self, store_id: int) -> StoreRetention:
        for store in self.stores:
            if store.id == store_id:
                return store
        raise KeyError(store_id)


def validate_days(days: int) -> None:
    """Refuse a retention the appliance cannot honour (the store's CHECK says at least 1)."""
    if not 1 <= days <= MAX_RETENTION_DAYS:
        raise ValueError(f"retention must be 1 to {MAX_RETENTION_DAYS} days, not {days}")


def retention_settings(root: Path | None = None) -> RetentionSettings:
    """The stores' retention from the message store, the logs' from the SMTP settings."""
    conn = msgstore.connect(root, readonly=True)
    try:
        rows = conn.execute(
            "SELECT id, name, retention_days FROM message_store ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    smtp = read_smtp_settings(root)
    return RetentionSettings(
        stores=tuple(StoreRetention(*row) for row in rows),
        smtp_log_days=smtp.smtp_log_retention_days,
        tracking_log_days=smtp.tracking_log_retention_days,
    )


def store_retention_set(store_id: int, days: int, root: Path | None = None) -> int:
    """Set one message store's retention; return the previous value (``KeyError``: no store)."""
    validate_days(days)
    conn = msgstore.connect(root)
    try:
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT retention_days FROM message_store WHERE id = ?", (store_id,)
            ).fetchone()
            if row is None:
                raise KeyError(store_id)
            conn.execute(
                "UPDATE message_store SET retention_days = ? WHERE id = ?", (days, store_id)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return int(row[0])


def log_retention_set(
    *,
    smtp_log_days: int | None = None,
    tracking_log_days: int | None = None,
    root: Path | None = None,
) -> tuple[int, int]:
    """Set the SMTP and/or tracking log retention; return the previous (smtp, tracking) days."""
    smtp = read_smtp_settings(root)
    previous = (smtp.smtp_log_retention_days, smtp.tracking_log_retention_days)
    if smtp_log_days is not None:
        validate_days(smtp_log_days)
        smtp.smtp_log_retention_days = smtp_log_days
    if tracking_log_days is not None:
        validate_days(tracking_log_days)
        smtp.tracking_log_retention_days = tracking_log_days
    write_smtp_settings(smtp, root)
    return previous


# --- What the store holds --------------------------------------------------------------------


@dataclass(frozen=True)
class StoreUsage:
    """A message store as Mail Security > Policy Objects > Message Stores shows it."""

    id: int
    name: str
    retention_days: int
    message_count: int
    bytes: int  # sum of the stored messages' sizes
    oldest: datetime | None


def store_usage(root: Path | None = None) -> list[StoreUsage]:
    """Every store with its message count, bytes and oldest message, by id.

    One range of the (store_id, received_at, size) index per store, never the table itself.
    """
    conn = msgstore.connect(root, readonly=True)
    try:
        stores = conn.execute(
            "SELECT id, name, retention_days FROM message_store ORDER BY id"
        ).fetchall()
        result = []
        for store_id, name, days in stores:
            count, size, oldest = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(received_at)"
                " FROM quarantined_message WHERE store_id = ?",
                (store_id,),
            ).fetchone()
            result.append(
                StoreUsage(
                    id=store_id,
                    name=name,
                    retention_days=days,
                    message_count=count,
                    bytes=size,
                    oldest=datetime.fromtimestamp(oldest, tz=UTC) if oldest is not None else None,
                )
            )
    finally:
        conn.close()
    return result


def log_oldest(root: Path | None = None) -> dict[str, datetime | None]:
    """The oldest entry of the SMTP log and of the tracking log (one index probe each)."""
    conn = msgstore.connect(root, readonly=True)
    try:
        result: dict[str, datetime | None] = {}
        for table in ("smtp_log", "tracking_log"):
            (oldest,) = conn.execute(f"SELECT min(logged_at) FROM {table}").fetchone()  # noqa: S608
            result[table] = datetime.fromtimestamp(oldest, tz=UTC) if oldest is not None else None
    finally:
        conn.close()
    return result


@dataclass(frozen=True)
class AgeDistribution:
    """Bytes on disk per whole day of age, for each store and for the two logs.

    ``bytes_by_age[d]`` is what the rows aged d to d+1 days occupy, so a retention of r days
    frees ``sum(bytes_by_age[r:])``. Row sizes are estimated from the columns and calibrated
    so that, together with the tables a purge never touches, they add up to the pages the
    database really uses. ``free_pages_bytes`` are pages already free inside the file, which
    any purge's vacuum returns to the disk.
    """

    stores: dict[int, tuple[int, ...]]
    smtp_log: tuple[int, ...]
    tracking_log: tuple[int, ...]
    file_bytes: int  # database plus write-ahead log on disk
    used_bytes: int  # pages in use
    free_pages_bytes: int
    measured_at: datetime


# Bytes a row costs beyond its variable-length text: record header, integers, the cell pointer,
# and each index entry's key, rowid and header. Calibration corrects the rest.
_MESSAGE_ROW_OVERHEAD = 64 + 24 + 16  # metadata row, its store index entry, the raw row
_SMTP_ROW_OVERHEAD = 32 + 20
_TRACKING_ROW_OVERHEAD = 48 + 4 * 20
_OTHER_ROW_BYTES = 48  # rows of tables a purge never touches (processing figures, meta)
_SAMPLE = 1000


def _bins(rows: list[tuple[int, int]]) -> tuple[int, ...]:
    """(age, bytes) rows into a tuple indexed by age."""
    if not rows:
        return ()
    result = [0] * (max(age for age, _ in rows) + 1)
    for age, size in rows:
        result[age] += size
    return tuple(result)


def _average(conn: sqlite3.Connection, expression: str, table: str) -> float:
    """Average of an expression over the newest rows (what the rows look like nowadays)."""
    (value,) = conn.execute(
        f"SELECT avg({expression}) FROM (SELECT * FROM {table} ORDER BY id DESC LIMIT ?)",  # noqa: S608
        (_SAMPLE,),
    ).fetchone()
    return float(value or 0.0)


def age_distribution(root: Path | None = None, *, now: datetime | None = None) -> AgeDistribution:
    """Bytes per day of age of each store and log, from GROUP BYs over the time indexes."""
    now_ts = int((now or datetime.now(UTC)).timestamp())
    path = layout(root).msgstore_db
    conn = msgstore.connect(root, readonly=True)
    try:
        message_rows = conn.execute(
            "SELECT store_id, max(0, (? - received_at) / 86400) AS age, count(*), sum(size)"
            " FROM quarantined_message GROUP BY store_id, age",
            (now_ts,),
        ).fetchall()
        smtp_rows = conn.execute(
            "SELECT max(0, (? - logged_at) / 86400) AS age, count(*) FROM smtp_log GROUP BY age",
            (now_ts,),
        ).fetchall()
        tracking_rows = conn.execute(
            "SELECT max(0, (? - logged_at) / 86400) AS age, count(*)"
            " FROM tracking_log GROUP BY age",
            (now_ts,),
        ).fetchall()
        message_text = _average(
            conn,
            "length(message_id) + length(sender) + length(recipients) + length(subject)",
            "quarantined_message",
        )
        smtp_row = _SMTP_ROW_OVERHEAD + _average(
            conn,
            "length(client_ip) + length(sender) + length(recipient) + length(response)",
            "smtp_log",
        )
        tracking_row = _TRACKING_ROW_OVERHEAD + _average(
            # sender, recipient and verdict are also keys of their indexes
            conn,
            "length(message_id) + 2 * length(sender) + 2 * length(recipient)"
            " + length(subject) + 2 * length(verdict) + length(action)",
            "tracking_log",
        )
        other_tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
            if name not in PURGED_TABLES
        ]
        other_rows = sum(
            conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]  # noqa: S608
            for name in other_tables
        )
        (btrees,) = conn.execute("SELECT count(*) FROM sqlite_schema WHERE rootpage > 0").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()

    per_message = _MESSAGE_ROW_OVERHEAD + message_text
    store_raw: dict[int, list[tuple[int, float]]] = {}
    for store_id, age, count, size in message_rows:
        store_raw.setdefault(store_id, []).append((age, size + count * per_message))
    smtp_raw = [(age, count * smtp_row) for age, count in smtp_rows]
    tracking_raw = [(age, count * tracking_row) for age, count in tracking_rows]

    estimated = sum(b for rows in store_raw.values() for _, b in rows)
    estimated += sum(b for _, b in smtp_raw) + sum(b for _, b in tracking_raw)
    used = (page_count - freelist) * page_size
    fixed = btrees * page_size + other_rows * _OTHER_ROW_BYTES
    scale = (used - fixed) / estimated if estimated > 0 and used > fixed else 1.0

    def scaled(rows: list[tuple[int, float]]) -> tuple[int, ...]:
        return _bins([(age, round(size * scale)) for age, size in rows])

    return AgeDistribution(
        stores={store_id: scaled(rows) for store_id, rows in store_raw.items()},
        smtp_log=scaled(smtp_raw),
        tracking_log=scaled(tracking_raw),
        file_bytes=msgstore.size_on_disk(path),
        used_bytes=used,
        free_pages_bytes=freelist * page_size,
        measured_at=datetime.fromtimestamp(now_ts, tz=UTC),
    )
