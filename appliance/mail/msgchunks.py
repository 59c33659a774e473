"""The chunk rules of a message store conversion, either way: what differs, what is copied,
what is verified.

The 2.8.1 upgrade converts the store forward (phase 2 prepare, phase 7 finish); Return to
2.8.0.0 converts it back with the same phases. Both run these functions with a
:class:`~appliance.mail.msgcounts.Direction`, so a change to a rule reaches prepare, its
catch-up and finish, both ways, at once: a rule that reached one of them and missed another
would convert a store wrongly. :mod:`appliance.mail.msgmigrate` holds the steps built from
them (prepare, finish, discard, the switch) and is the module to call; the rules live here so
that neither module grows past what one can read.

The file being built is ``main``, the store is ``src``, attached read-only: nothing here can
write the store's mail. Imports go one way: msgstore <- msgcounts <- msgjournal <- msgchunks
<- msgmigrate.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.mail import msgstore, quarantine
from appliance.mail.msgcounts import (
    CHUNKED_TABLES,
    FORWARD,
    SMALL_TABLES,
    ChunkedTable,
    DigestCache,
    Direction,
    StoreCounts,
    chunk_digest,
    chunk_range,
    counts_in,
    small_digest,
    verified_body,
)
from appliance.mail.msgjournal import Fingerprinted
from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.paths import layout

BUSY_TIMEOUT_MS = 30_000


class MigrationStopped(ApplianceError):
    """``should_stop`` asked a prepare to stop; the partial file stays for a rerun or discard."""


@dataclass(frozen=True)
class MigrateProgress:
    """Where a conversion step is: ``step`` is copy, verify, swap, backup or restore."""

    step: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


ProgressCallback = Callable[[MigrateProgress], None]


# --- The file being built --------------------------------------------------------------------


def partial_path(root: Path | None = None, direction: Direction = FORWARD) -> Path:
    """The file a conversion builds next to the store, named for the format it is in."""
    return layout(root).msgstore_dir / f"msgstore-{direction.target}.db.partial"


def _raw_of(message_id: int, codec: str, raw_size: int, stored_sha: bytes, body: bytes) -> bytes:
    """``mm_raw``: a 2.8.1 body as the raw message, checked against its SHA-256 and length."""
    return verified_body(message_id, codec, raw_size, stored_sha, body)[0]


def open_partial(
    root: Path | None, direction: Direction = FORWARD
) -> tuple[sqlite3.Connection, bool]:
    """The partial file in ``direction.target`` with the live store attached as ``src``
    (read-only).

    Returns (connection, created). A partial that SQLite cannot read (a power cut while it was
    written without syncs) is removed and started again.
    """
    target = direction.target
    path = partial_path(root, direction)
    created = not path.exists()
    for attempt in range(2):
        try:
            if not path.exists():
                created = True
                # Without secondary indexes: the bulk load builds them once at the end.
                msgstore.create_at(path, format_version=target, indexes=False)
            conn = sqlite3.connect(path.as_uri(), uri=True, timeout=30, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                version = msgstore.connection_format(conn)
                stored = conn.execute(
                    "SELECT value FROM meta WHERE key = 'format_version'"
                ).fetchone()
                if version != target or stored is None or stored[0] != target:
                    raise sqlite3.DatabaseError(f"not a partial {target} store")
            except BaseException:
                conn.close()
                raise
            break
        except sqlite3.DatabaseError:
            if attempt:
                raise
            for stale in (path, *msgstore.wal_files(path)):
                stale.unlink(missing_ok=True)
    # Syncs are skipped while building: the file is fsynced once before it is switched in,
    # and a file damaged by a power cut meanwhile is detected above or by the verification.
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -131072")
    conn.execute("PRAGMA foreign_keys = OFF")  # chunks of related tables land one by one
    conn.create_function(
        "mm_sha256", 1, lambda raw: hashlib.sha256(raw).digest(), deterministic=True
    )
    conn.create_function("mm_compress", 1, msgstore.compress_body, deterministic=True)
    conn.create_function("mm_raw", 5, _raw_of, deterministic=True)
    source = layout(root).msgstore_db
    conn.execute("ATTACH DATABASE ? AS src", (f"{source.as_uri()}?mode=ro",))
    return conn, created


def source_format(conn: sqlite3.Connection) -> str:
    """The format the attached store records in its ``meta``."""
    row = conn.execute("SELECT value FROM src.meta WHERE key = 'format_version'").fetchone()
    if row is None:
        raise MalformedApplianceFile("the message store records no format version")
    return str(row[0])


# --- Copying ---------------------------------------------------------------------------------


def _copy_fault(
    conn: sqlite3.Connection, big: ChunkedTable, chunk: int, source: str
) -> MalformedApplianceFile | None:
    """Why a copy's own check (``mm_raw``) refused a row of this chunk: SQLite says only that a
    function failed, so the chunk is read again with the same check, which names the message."""
    try:
        chunk_digest(conn, "src", big, source, chunk)
    except MalformedApplianceFile as fault:
        return fault
    return None


def copy_chunk(
    conn: sqlite3.Connection, big: ChunkedTable, chunk: int, direction: Direction = FORWARD
) -> None:
    """One chunk of one table, replaced whole in the file being built, in one transaction.

    Raises :class:`MalformedApplianceFile` when a 2.8.1 body fails its SHA-256 or length on
    the way back: a damaged message is never copied as if it were whole.
    """
    target = direction.target
    key = big.key[target]
    lo, hi = chunk_range(chunk)
    with msgstore.write_transaction(conn):
        conn.execute(
            f"DELETE FROM main.{big.table[target]} WHERE {key} >= ? AND {key} < ?",  # noqa: S608
            (lo, hi),
        )
        try:
            conn.execute(big.copy[target], {"lo": lo, "hi": hi})
        except sqlite3.OperationalError as exc:
            fault = _copy_fault(conn, big, chunk, direction.source)
            if fault is None:
                raise
            raise fault from exc


RELEASE_COLUMNS = "message_id, state, started_at, released_at, released_by, queue_id"


def copy_releases(conn: sqlite3.Connection) -> bool:
    """Copy the quarantine's release records (made only once something was released) when they
    differ; True if they did. Without them a message released before the conversion would look
    unreleased after it, and could be delivered twice. Spelled alike in both formats."""
    has = quarantine.has_release_table
    if not has(conn, "src"):
        return False
    if has(conn, "main") and small_digest(
        conn, "src", "quarantine_release", RELEASE_COLUMNS
    ) == small_digest(conn, "main", "quarantine_release", RELEASE_COLUMNS):
        return False
    with msgstore.write_transaction(conn):
        conn.execute(
            quarantine.RELEASE_TABLE_SQL.replace(
                "EXISTS quarantine_release", "EXISTS main.quarantine_release", 1
            )
        )
        conn.execute("DELETE FROM main.quarantine_release")
        conn.execute(
            f"INSERT INTO main.quarantine_release ({RELEASE_COLUMNS}) "  # noqa: S608
            f"SELECT {RELEASE_COLUMNS} FROM src.quarantine_release"
        )
    return True


def copy_small(conn: sqlite3.Connection) -> bool:
    """Copy the small tables (spelled alike in both formats) that differ; True if any did."""
    changed = [
        (table, columns)
        for _, table, columns in SMALL_TABLES
        if small_digest(conn, "src", table, columns) != small_digest(conn, "main", table, columns)
    ]
    if not changed:
        return False
    with msgstore.write_transaction(conn):
        for _, table, columns in SMALL_TABLES:  # all three when any differs: the triggers link them
            conn.execute(f"DELETE FROM main.{table}")  # noqa: S608
            conn.execute(
                f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM src.{table}"  # noqa: S608
            )
    return True


def sync(
    conn: sqlite3.Connection,
    *,
    state: Fingerprinted,
    pause: float,
    should_stop: Callable[[], bool] | None,
    progress: ProgressCallback | None,
    max_passes: int,
    yield_ratio: float = 0.0,
    force: list[tuple[ChunkedTable, int]] | None = None,
) -> tuple[int, int]:
    """Copy every chunk that differs, pass after pass; returns (chunks copied, passes).

    ``state`` (which also says the direction) receives the fingerprints of both sides as they
    are at the end: with mail stopped, the verification reuses them instead of scanning the
    tables again. After each chunk the copy sleeps ``pause`` seconds or ``yield_ratio`` times
    as long as the chunk took, whichever is longer: a fixed pause is too little on a slow disk
    and too much on a fast one, while a ratio leaves the mail service the same share of the
    machine on any.
    """
    copied = passes = 0
    while passes < max_passes:
        todo = state.measure(conn) if force is None or passes else force
        passes += 1
        for done, (big, chunk) in enumerate(todo):
            if should_stop is not None and should_stop():
                raise MigrationStopped("message store conversion stopped")
            began = time.monotonic()
            copy_chunk(conn, big, chunk, state.direction)
            state.copied(conn, big, chunk)
            copied += 1
            if progress is not None:
                progress(MigrateProgress("copy", done + 1, len(todo)))
            rest = max(pause, (time.monotonic() - began) * yield_ratio)
            if rest > 0:
                time.sleep(rest)
        small = copy_small(conn) | copy_releases(conn)
        if not todo and not small:
            break
    return copied, passes


def catch_up(
    conn: sqlite3.Connection,
    cache: DigestCache,
    state: Fingerprinted,
    changed: dict[str, set[int]],
    *,
    pause: float,
    progress: ProgressCallback | None,
    should_stop: Callable[[], bool] | None = None,
    yield_ratio: float = 0.0,
) -> int:
    """Copy the chunks the journal names (and any other whose saved fingerprints differ),
    after dropping their cached digests so the next :func:`verify` reads them again; the
    chunks copied. ``state`` is kept current."""
    force = state.journaled(conn, changed)
    for big in CHUNKED_TABLES:
        cache.forget(big, changed.get(big.name, set()))
    copied, _ = sync(
        conn,
        state=state,
        pause=pause,
        should_stop=should_stop,
        progress=progress,
        max_passes=1,
        yield_ratio=yield_ratio,
        force=force,
    )
    return copied


def verify(
    conn: sqlite3.Connection,
    cache: DigestCache,
    progress: ProgressCallback | None,
    state: Fingerprinted | None = None,
    *,
    direction: Direction = FORWARD,
    pause: float = 0.0,
    yield_ratio: float = 0.0,
) -> tuple[StoreCounts, StoreCounts]:
    """(old, new) counts of the attached store and the file being built; a body of the store
    failing its checksum raises (one of the file being built only fails to match).

    While mail flows (prepare), each chunk digested is followed by a rest as in :func:`sync`:
    reading back and decompressing the whole store is the longest step of phase 2. Its
    progress counts every chunk of both sides, the cached ones too, out of all of them: the
    fingerprints are measured first when ``state`` has none (then used by the digests).
    """
    if state is None or not state.old:
        state = state or Fingerprinted(direction=direction)
        state.measure(conn)
    total = sum(map(len, state.old.values())) + sum(map(len, state.new.values()))
    done = 0
    last = time.monotonic()

    def report(digested: bool) -> None:
        nonlocal done, last
        done += 1
        if progress is not None:
            progress(MigrateProgress("verify", done, total))
        if not digested:
            return
        rest = max(pause, (time.monotonic() - last) * yield_ratio)
        if rest > 0:
            time.sleep(rest)
        last = time.monotonic()

    old = counts_in(conn, "src", direction.source, cache, report, fingerprints=state.old)
    new = counts_in(
        conn, "main", direction.target, cache, report, tolerant=True, fingerprints=state.new
    )
    return old, new
