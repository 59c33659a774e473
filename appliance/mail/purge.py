"""The purge that reclaims the message store's disk space once its retentions are lowered.

The guide's "Reclaiming disk space" lowers three retentions (see :mod:`appliance.mail.retention`).
Lowering them only helps if the expired rows are then deleted and the file actually gets
smaller, which is what :func:`purge_expired` does:

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

from appliance.mail import msgstore
from appliance.mail.retention import RetentionSettings, retention_settings
from appliance.system.paths import layout

DAY = 86_400

# How long a purge transaction waits for the mail service's write lock, as long as the service
# waits for the purge's.
BUSY_TIMEOUT_MS = 30_000


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
    store_bytes_before = msgstore.size_on_disk(path)
    disk_free_before = disk_free_bytes(path.parent)
    state = PurgeProgress(messages_deleted={store.id: 0 for store in settings.stores})
    phase_started = {"messages": time.monotonic()}

    def begin(phase: str) -> None:
        state.phase = phase
        phase_started[phase] = time.monotonic()

    def purge_log(table: str, days: int) -> Iterator[int]:
        """Delete the log's rows older than ``days``, oldest first; yield each batch's count."""
        begin(table)
        yield from purge.delete(
            table,
            f"SELECT id FROM {table} WHERE logged_at < ? ORDER BY logged_at",  # noqa: S608
            (now_ts - days * DAY,),
        )

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
        for deleted in purge_log("smtp_log", settings.smtp_log_days):
            state.smtp_log_deleted += deleted
        for deleted in purge_log("tracking_log", settings.tracking_log_days):
            state.tracking_log_deleted += deleted
        begin("vacuum")
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
        store_bytes_after=msgstore.size_on_disk(path),
        disk_free_before=disk_free_before,
        disk_free_after=disk_free_bytes(path.parent),
        seconds=ended - started,
        phase_seconds=phase_seconds,
        settings=settings,
    )
