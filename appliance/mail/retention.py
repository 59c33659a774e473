"""Retention of the message store: what it keeps, how old it is, and the purge that reclaims it.

The guide's "Reclaiming disk space" lowers three retentions: per message store (Mail Security >
Policy Objects > Message Stores), the SMTP log (SMTP > Configuration > Maintenance) and the
message tracking log (Mail Security > Policy > Message Tracking / Reporting). Lowering them
only helps if the expired rows are then deleted and the file actually gets smaller, which is
what :func:`purge_expired` does:

1. Delete expired rows oldest first, in short write transactions (sized by measuring the
   previous one) with a pause after each, so that the mail service, which writes to the same
   database with a busy timeout, gets the write lock within milliseconds. Transactions are
   shorter and pauses longer while another connection is seen committing (the mail service
   is busy) than while nobody else writes; see :class:`Pacing`.
2. In the same transaction, hand the pages the batch freed back to the disk with
   ``PRAGMA incremental_vacuum`` (the store is created with ``auto_vacuum = INCREMENTAL``).
   Pages freed and truncated before the commit never reach the write-ahead log, and the
   freelist stays short (SQLite looks each page up in it), which together is several times
   cheaper than one vacuum pass at the end. A plain ``VACUUM`` would rewrite the whole store,
   need as much free space again, and block the mail service for the whole time.
3. Checkpoint the write-ahead log, so the database file is really cut and the log emptied.

Python's sqlite3 steps a statement once when it returns no columns, so one
``PRAGMA incremental_vacuum(N)`` frees one page, not N; the pragma therefore runs once per page
(the per-page cost is SQLite's own, not Python's).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.mail import msgstore
from appliance.system.paths import layout

DAY = 86_400
# How long a purge transaction waits for the mail service's write lock, as long as the service
# waits for the purge's.
BUSY_TIMEOUT_MS = 30_000
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
        file_bytes=_size_on_disk(path),
        used_bytes=used,
        free_pages_bytes=freelist * page_size,
        measured_at=datetime.fromtimestamp(now_ts, tz=UTC),
    )


# --- The purge -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pacing:
    """How a purge shares the database with the mail service.

    Every write transaction aims at a duration; the rows or pages of the next one are scaled
    from how long the last one took, within the limits. After each commit the purge pauses for
    a multiple of that duration. While another connection has committed within
    ``busy_window`` seconds (the mail service is writing), transactions are short and the
    pause as long as the transaction: the service's busy handler retries at growing intervals
    of up to 100 ms, and only a pause of that order lets it in within milliseconds. While
    nobody else writes, transactions are longer and pauses short, which is several times
    faster for the tracking log, whose five indexes make small batches expensive.
    """

    busy_target: float = 0.025
    busy_pause: float = 1.0
    idle_target: float = 0.1
    idle_pause: float = 0.25
    busy_window: float = 5.0
    first_rows: int = 5_000
    min_rows: int = 200
    max_rows: int = 20_000
    first_pages: int = 512
    min_pages: int = 16
    max_pages: int = 8_192
    checkpoint: bool = True  # checkpoint after every transaction


@dataclass
class PurgeProgress:
    """What a purge has done so far; handed to the progress callback after every transaction."""

    phase: str = "messages"  # messages, smtp_log, tracking_log, vacuum
    messages_deleted: dict[int, int] = field(default_factory=dict)  # per store id
    smtp_log_deleted: int = 0
    tracking_log_deleted: int = 0
    pages_returned: int = 0

    @property
    def rows_deleted(self) -> int:
        return (
            sum(self.messages_deleted.values()) + self.smtp_log_deleted + self.tracking_log_deleted
        )


@dataclass(frozen=True)
class PurgeResult:
    """What a purge deleted and what it gave back to the disk."""

    messages_deleted: dict[int, int]
    smtp_log_deleted: int
    tracking_log_deleted: int
    pages_returned: int
    store_bytes_before: int  # database plus write-ahead log
    store_bytes_after: int
    disk_free_before: int  # free bytes of the message store's disk (statvfs f_bavail)
    disk_free_after: int
    seconds: float
    phase_seconds: dict[str, float]
    settings: RetentionSettings

    @property
    def rows_deleted(self) -> int:
        return (
            sum(self.messages_deleted.values()) + self.smtp_log_deleted + self.tracking_log_deleted
        )

    @property
    def bytes_reclaimed(self) -> int:
        """How much smaller the store got on disk."""
        return max(0, self.store_bytes_before - self.store_bytes_after)


ProgressCallback = Callable[[PurgeProgress], None]


def _size_on_disk(db: Path) -> int:
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def disk_free_bytes(path: Path) -> int:
    """Free bytes an unprivileged process may use on the disk holding path (as df's Avail)."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class _Pacer:
    """Runs the purge's write transactions, sizes them, and pauses after each (see Pacing)."""

    def __init__(self, conn: sqlite3.Connection, pacing: Pacing) -> None:
        self.conn = conn
        self.pacing = pacing
        self.data_version = self._data_version()
        self.last_foreign_commit = float("-inf")
        self.elapsed = 0.0
        self.rng = random.Random()  # noqa: S311 - jitter, not a secret

    def _data_version(self) -> int:
        # Changes exactly when another connection has committed since this one last looked.
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    @property
    def busy(self) -> bool:
        return time.monotonic() - self.last_foreign_commit < self.pacing.busy_window

    def next_size(self, size: int, low: int, high: int) -> int:
        """Scale the last batch towards the target duration, at most doubling or halving it."""
        target = self.pacing.busy_target if self.busy else self.pacing.idle_target
        factor = 2.0 if self.elapsed <= 0 else min(2.0, max(0.5, target / self.elapsed))
        return max(low, min(high, int(size * factor)))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, then the pause."""
        if self._data_version() != self.data_version:
            self.last_foreign_commit = time.monotonic()
        self.conn.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self.elapsed = time.monotonic() - started
        if self.pacing.checkpoint:
            # Copy this batch's frames back now, on the purge's time: otherwise the mail
            # service's next commit finds the log over its autocheckpoint size and does it.
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.data_version = self._data_version()
        ratio = self.pacing.busy_pause if self.busy else self.pacing.idle_pause
        # Jittered, so the pauses do not fall into step with the other side's retries.
        time.sleep(self.elapsed * ratio * self.rng.uniform(0.5, 1.5))


class _Purge:
    """One purge over one connection: deletes in batches, each followed by returning pages."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        pacing: Pacing,
        state: PurgeProgress,
        progress: ProgressCallback | None,
    ) -> None:
        self.conn = conn
        self.pacer = _Pacer(conn, pacing)
        self.state = state
        self.progress = progress
        self.rows = pacing.first_rows
        self.pages = pacing.first_pages

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.state)

    def delete(self, table: str, select_ids: str, params: tuple[object, ...]) -> Iterator[int]:
        """Delete what select_ids names (oldest first) batch by batch; yield each batch's count.

        The pages a batch frees go back to the disk in the same transaction. Pages freed and
        truncated before the commit are never written to the write-ahead log, and SQLite's
        incremental vacuum looks each page up in the freelist, which costs more the longer the
        list is: together several times cheaper than one vacuum pass at the end.
        """
        pacing = self.pacer.pacing
        statement = f"DELETE FROM {table} WHERE id IN ({select_ids} LIMIT ?)"  # noqa: S608
        while True:
            with self.pacer.transaction():
                deleted = self.conn.execute(statement, (*params, self.rows)).rowcount
                returned = self._vacuum(pacing.max_pages)
            full = deleted == self.rows
            self.rows = self.pacer.next_size(self.rows, pacing.min_rows, pacing.max_rows)
            self.state.pages_returned += returned
            yield deleted
            self.report()
            if not full:
                return

    def _vacuum(self, limit: int) -> int:
        """Return up to limit free pages to the disk, inside the caller's transaction."""
        step = min(limit, int(self.conn.execute("PRAGMA freelist_count").fetchone()[0]))
        for _ in range(step):
            self.conn.execute("PRAGMA incremental_vacuum(1)")
        return step

    def return_pages(self) -> None:
        """Hand every free page of the file back to the disk, a measured step per transaction."""
        pacing = self.pacer.pacing
        while int(self.conn.execute("PRAGMA freelist_count").fetchone()[0]):
            with self.pacer.transaction():
                returned = self._vacuum(self.pages)
            self.pages = self.pacer.next_size(self.pages, pacing.min_pages, pacing.max_pages)
            self.state.pages_returned += returned
            self.report()


def purge_expired(
    root: Path | None = None,
    *,
    now: datetime | None = None,
    progress: ProgressCallback | None = None,
    pacing: Pacing | None = None,
) -> PurgeResult:
    """Delete every row past its retention and give the freed space back to the disk.

    The retentions are read when the purge starts. ``progress`` is called after every
    transaction; if it raises, the purge stops there and the exception propagates (what was
    committed stays deleted, which is always safe: every deleted row had expired).
    """
    started = time.monotonic()
    now_ts = int((now or datetime.now(UTC)).timestamp())
    path = layout(root).msgstore_db
    settings = retention_settings(root)
    store_bytes_before = _size_on_disk(path)
    disk_free_before = disk_free_bytes(path.parent)
    state = PurgeProgress(messages_deleted={store.id: 0 for store in settings.stores})
    phase_started = {"messages": time.monotonic()}

    conn = msgstore.connect(root)
    try:
        conn.isolation_level = None  # transactions are explicit
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Losing the last batches to a power cut is harmless (those rows are deleted again next
        # time), so commits need not wait for the disk.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Deleting from five indexes touches index pages all over the file; keep them cached.
        conn.execute("PRAGMA cache_size = -131072")
        purge = _Purge(conn, pacing or Pacing(), state, progress)
        purge.report()
        # Pages freed before this purge (by a purge that was stopped) go back first.
        purge.return_pages()
        for store in settings.stores:
            # The raw message goes with its row (ON DELETE CASCADE).
            for deleted in purge.delete(
                "quarantined_message",
                "SELECT id FROM quarantined_message WHERE store_id = ? AND received_at < ?"
                " ORDER BY received_at",
                (store.id, now_ts - store.retention_days * DAY),
            ):
                state.messages_deleted[store.id] += deleted
        state.phase = "smtp_log"
        phase_started["smtp_log"] = time.monotonic()
        for deleted in purge.delete(
            "smtp_log",
            "SELECT id FROM smtp_log WHERE logged_at < ? ORDER BY logged_at",
            (now_ts - settings.smtp_log_days * DAY,),
        ):
            state.smtp_log_deleted += deleted
        state.phase = "tracking_log"
        phase_started["tracking_log"] = time.monotonic()
        for deleted in purge.delete(
            "tracking_log",
            "SELECT id FROM tracking_log WHERE logged_at < ? ORDER BY logged_at",
            (now_ts - settings.tracking_log_days * DAY,),
        ):
            state.tracking_log_deleted += deleted
        state.phase = "vacuum"
        phase_started["vacuum"] = time.monotonic()
        purge.report()
        purge.return_pages()
        # The database file only shrinks when a checkpoint has copied every frame back, and
        # TRUNCATE also empties the write-ahead log. If a reader holds an old snapshot it gives
        # up after the busy timeout, and the next checkpoint finishes the job.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    ended = time.monotonic()
    phases = list(phase_started.items())
    phase_seconds = {
        name: round((phases[i + 1][1] if i + 1 < len(phases) else ended) - begun, 3)
        for i, (name, begun) in enumerate(phases)
    }
    return PurgeResult(
        messages_deleted=dict(state.messages_deleted),
        smtp_log_deleted=state.smtp_log_deleted,
        tracking_log_deleted=state.tracking_log_deleted,
        pages_returned=state.pages_returned,
        store_bytes_before=store_bytes_before,
        store_bytes_after=_size_on_disk(path),
        disk_free_before=disk_free_before,
        disk_free_after=disk_free_bytes(path.parent),
        seconds=ended - started,
        phase_seconds=phase_seconds,
        settings=settings,
    )
