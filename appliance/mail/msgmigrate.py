"""The 2.8.1 upgrade's message store conversion: phases 2 (prepare) and 7 (finish).

The guide stops mail for the whole conversion; a million messages took it up to 30 minutes.
Here nearly all of the work happens in phase 2, while mail flows, and the downtime only pays
for what changed since:

- Every big table is cut into chunks of 8,192 ids. A chunk's *fingerprint* (row count, sum of
  ids and of a time and a size column) comes from one GROUP BY at C speed, in either format.
  A chunk whose fingerprints differ between the old store and the new file is (re)copied as a
  whole: that one rule covers mail added since, rows purged since, and a prepare that was
  killed halfway, so every step is simply run again after a crash.
- :func:`migrate_prepare` builds ``msgstore-2.8.1.db.partial`` next to the store, one chunk per
  short transaction with a pause after each, reading the live store in WAL mode (readers never
  block the mail service's writer). It then digests both sides chunk by chunk, which reads the
  new bodies back, decompresses them and checks their SHA-256 (a read-back, as update engines
  do before switching).
- :func:`migrate_finish` (mail stopped) recopies the few changed chunks, compares counts and
  checksums, and swaps the file in with one rename. It finds those chunks in the old store's
  journal of changes (:mod:`appliance.mail.msgjournal`), not by reading the whole store again,
  so its time follows the mail that came in during phase 2, not the store's size.

Counts, fingerprints and checksums, equal for the same content in either format, are
:mod:`appliance.mail.msgcounts`'s; phase 4's checksummed copy of the store, and putting it back,
:mod:`appliance.mail.msgbackup`'s.

Prepare, its catch-up and finish stay in this one module, longer than most: they share the
chunk rules (what differs, what is copied, what is verified), and a change that reached one of
them and missed another would convert a store wrongly.

Kill safety: the 2.8.0 file's mail is never written by the conversion (only its journal
triggers and table, added by prepare and dropped by discard); the new file becomes the store
only by ``rename`` after verification, and the old write-ahead log is checkpointed and removed
first (a stale ``-wal`` would otherwise be replayed into the new file). At every instant the
store is the complete 2.8.0 store or the complete verified 2.8.1 one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.mail import msgstore
from appliance.mail.msgcounts import (
    CHUNKED_TABLES,
    SMALL_TABLES,
    ChunkedTable,
    DigestCache,
    StoreCounts,
    cache_path,
    chunk_range,
    counts_in,
    small_digest,
    store_counts,
    table_digests,
)
from appliance.mail.msgjournal import (
    SAVED_STATE,
    Fingerprinted,
    journal_chunks,
    journal_clear,
    journal_remove,
    journal_start,
    journal_take,
    state_forget,
    state_save,
    state_saved,
)
from appliance.system.atomic import exclusive_lock, fsync_dir
from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.paths import layout

OLD_FORMAT = msgstore.FORMAT_VERSION
NEW_FORMAT = msgstore.FORMAT_2_8_1
BUSY_TIMEOUT_MS = 30_000
# A prepare makes passes until nothing changed during the last; under steady mail the last
# chunk always changes, so it stops after a few and leaves the rest to finish.
MAX_PASSES = 3
# Rounds of catching up with the journal after prepare's verification: each takes about as
# long as the mail the one before saw takes to copy, so two leave phase 7 the last moments.
CATCH_UP_ROUNDS = 2


class MigrationStopped(ApplianceError):
    """``should_stop`` asked a prepare to stop; the partial file stays for a rerun or discard."""


class MigrationVerifyError(ApplianceError):
    """The new store does not hold what the old one holds; nothing was switched."""


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


@dataclass(frozen=True)
class PrepareResult:
    """What phase 2 built: the partial file and whether it matched the live store at the end."""

    path: Path
    seconds: float
    chunks_copied: int
    passes: int
    in_sync: bool  # counts and checksum equal at the end (mail arriving makes this False)
    counts: StoreCounts | None  # of the partial file; None when the store was already 2.8.1
    bytes: int


@dataclass(frozen=True)
class MigrateResult:
    """Phase 7's outcome, stored in the new store so a rerun returns it unchanged."""

    format_version: str
    seconds: float
    chunks_copied: int
    full_conversion: bool  # prepare had not run (or its file was unusable)
    counts: StoreCounts
    store_bytes_before: int
    store_bytes_after: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MigrateResult:
        data = json.loads(text)
        data["counts"] = StoreCounts.from_json(data["counts"])
        return cls(**data)


# --- Files -----------------------------------------------------------------------------------


def partial_path(root: Path | None = None) -> Path:
    return layout(root).msgstore_dir / f"msgstore-{NEW_FORMAT}.db.partial"


def _lock_path(root: Path | None) -> Path:
    return layout(root).msgstore_dir / ".msgmigrate.lock"


@contextlib.contextmanager
def conversion_lock(root: Path | None) -> Iterator[None]:
    """One conversion step at a time per appliance (the kernel drops it if we are killed)."""
    lock = _lock_path(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock):
        yield


# --- Building the new file -------------------------------------------------------------------


def _open_partial(root: Path | None) -> tuple[sqlite3.Connection, bool]:
    """The partial 2.8.1 file with the live store attached as ``src`` (read-only).

    Returns (connection, created). A partial that SQLite cannot read (a power cut while it was
    written without syncs) is removed and started again.
    """
    path = partial_path(root)
    created = not path.exists()
    for attempt in range(2):
        try:
            if not path.exists():
                created = True
                # Without secondary indexes: the bulk load builds them once at the end.
                msgstore.create_at(path, format_version=NEW_FORMAT, indexes=False)
            conn = sqlite3.connect(path.as_uri(), uri=True, timeout=30, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                version = msgstore.connection_format(conn)
                stored = conn.execute(
                    "SELECT value FROM meta WHERE key = 'format_version'"
                ).fetchone()
                if version != NEW_FORMAT or stored is None or stored[0] != NEW_FORMAT:
                    raise sqlite3.DatabaseError("not a partial 2.8.1 store")
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
    source = layout(root).msgstore_db
    conn.execute("ATTACH DATABASE ? AS src", (f"{source.as_uri()}?mode=ro",))
    return conn, created


def _source_format(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM src.meta WHERE key = 'format_version'").fetchone()
    if row is None:
        raise MalformedApplianceFile("the message store records no format version")
    return str(row[0])


def _copy_chunk(conn: sqlite3.Connection, big: ChunkedTable, chunk: int) -> None:
    key = big.key[NEW_FORMAT]
    lo, hi = chunk_range(chunk)
    with msgstore.write_transaction(conn):
        conn.execute(
            f"DELETE FROM main.{big.table[NEW_FORMAT]} WHERE {key} >= ? AND {key} < ?",  # noqa: S608
            (lo, hi),
        )
        conn.execute(big.copy, {"lo": lo, "hi": hi})


RELEASE_COLUMNS = "message_id, state, started_at, released_at, released_by, queue_id"


def _copy_releases(conn: sqlite3.Connection) -> bool:
    """Copy the quarantine's release records (made only once something was released) when they
    differ; True if they did. Without them a message released before the upgrade would look
    unreleased after it, and could be delivered twice."""
    has = msgstore.has_release_table
    if not has(conn, "src"):
        return False
    if has(conn, "main") and small_digest(
        conn, "src", "quarantine_release", RELEASE_COLUMNS
    ) == small_digest(conn, "main", "quarantine_release", RELEASE_COLUMNS):
        return False
    with msgstore.write_transaction(conn):
        conn.execute(
            msgstore.RELEASE_TABLE_SQL.replace(
                "EXISTS quarantine_release", "EXISTS main.quarantine_release", 1
            )
        )
        conn.execute("DELETE FROM main.quarantine_release")
        conn.execute(
            f"INSERT INTO main.quarantine_release ({RELEASE_COLUMNS}) "  # noqa: S608
            f"SELECT {RELEASE_COLUMNS} FROM src.quarantine_release"
        )
    return True


def _copy_small(conn: sqlite3.Connection) -> bool:
    """Copy the small tables that differ; True if any did."""
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


def _sync(
    conn: sqlite3.Connection,
    *,
    pause: float,
    should_stop: Callable[[], bool] | None,
    progress: ProgressCallback | None,
    max_passes: int,
    yield_ratio: float = 0.0,
    force: list[tuple[ChunkedTable, int]] | None = None,
    state: Fingerprinted | None = None,
) -> tuple[int, int]:
    """Copy every chunk that differs, pass after pass; returns (chunks copied, passes).

    ``state`` receives the fingerprints of both sides as they are at the end: with mail
    stopped, the verification reuses them instead of scanning the tables again. After each
    chunk the copy sleeps ``pause`` seconds or ``yield_ratio`` times as long as the chunk took,
    whichever is longer: a fixed pause is too little on a slow disk and too much on a fast one,
    while a ratio leaves the mail service the same share of the machine on any.
    """
    state = state if state is not None else Fingerprinted()
    copied = passes = 0
    while passes < max_passes:
        todo = state.measure(conn) if force is None or passes else force
        passes += 1
        for done, (big, chunk) in enumerate(todo):
            if should_stop is not None and should_stop():
                raise MigrationStopped("message store conversion stopped")
            began = time.monotonic()
            _copy_chunk(conn, big, chunk)
            state.copied(conn, big, chunk)
            copied += 1
            if progress is not None:
                progress(MigrateProgress("copy", done + 1, len(todo)))
            rest = max(pause, (time.monotonic() - began) * yield_ratio)
            if rest > 0:
                time.sleep(rest)
        small = _copy_small(conn) | _copy_releases(conn)
        if not todo and not small:
            break
    return copied, passes


def _catch_up(
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
    after dropping their cached digests so the next :func:`_verify` reads them again; the
    chunks copied. ``state`` is kept current."""
    force = state.journaled(conn, changed)
    for big in CHUNKED_TABLES:
        cache.forget(big, changed.get(big.name, set()))
    copied, _ = _sync(
        conn,
        pause=pause,
        should_stop=should_stop,
        progress=progress,
        max_passes=1,
        yield_ratio=yield_ratio,
        force=force,
        state=state,
    )
    return copied


def _verify(
    conn: sqlite3.Connection,
    cache: DigestCache,
    progress: ProgressCallback | None,
    state: Fingerprinted | None = None,
    *,
    pause: float = 0.0,
    yield_ratio: float = 0.0,
) -> tuple[StoreCounts, StoreCounts]:
    """(old, new) counts of the attached store and the partial file.

    While mail flows (prepare), each chunk digested is followed by a rest as in :func:`_sync`:
    reading back and decompressing the whole store is the longest step of phase 2.
    """
    done = 0
    last = time.monotonic()

    def report() -> None:
        nonlocal done, last
        done += 1
        if progress is not None:
            progress(MigrateProgress("verify", done, 0))
        rest = max(pause, (time.monotonic() - last) * yield_ratio)
        if rest > 0:
            time.sleep(rest)
        last = time.monotonic()

    old = counts_in(conn, "src", OLD_FORMAT, cache, report, fingerprints=state and state.old)
    new = counts_in(
        conn, "main", NEW_FORMAT, cache, report, tolerant=True, fingerprints=state and state.new
    )
    return old, new


def migrate_prepare(
    root: Path | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    pause: float = 0.0,
    yield_ratio: float = 0.0,
) -> PrepareResult:
    """Phase 2, while mail flows: build the 2.8.1 file next to the store, chunk by chunk.

    Each chunk is one short transaction on the new file, reading the live store through a
    read-only snapshot of its own; ``pause`` seconds after each, or ``yield_ratio`` times the
    chunk's own time, leave the machine to the mail service. Run it again at any time (after a
    kill, or to catch up): it copies only chunks that differ. ``should_stop`` is asked before
    every chunk; True raises :class:`MigrationStopped`, leaving the partial file (resume or
    :func:`migrate_discard`).
    """
    started = time.monotonic()
    with conversion_lock(root):
        if msgstore.format_version(root) == NEW_FORMAT:
            return PrepareResult(partial_path(root), 0.0, 0, 0, True, None, 0)
        conn, _ = _open_partial(root)
        cache = DigestCache(cache_path(root))
        try:
            if _source_format(conn) != OLD_FORMAT:
                raise ApplianceError(f"the message store is not in format {OLD_FORMAT}")
            # Forget what an earlier run saved before anything changes, then journal the old
            # store's changes from before the first measurement on (appliance.mail.msgjournal).
            state_forget(conn)
            journal_start(layout(root).msgstore_db)
            copied, passes = _sync(
                conn,
                pause=pause,
                should_stop=should_stop,
                progress=progress,
                max_passes=MAX_PASSES,
                yield_ratio=yield_ratio,
            )
            # Once, after the bulk load; later chunks maintain them row by row.
            msgstore.create_indexes(conn)
            conn.execute("ANALYZE main")
            # The last measurement and the digests from one snapshot of both files: what
            # phase 7 trusts for every chunk the journal does not name afterwards. The journal
            # is emptied just before, so phase 7 sees only what came after (or during) it.
            db = layout(root).msgstore_db
            journal_clear(db)
            state = Fingerprinted()
            conn.execute("BEGIN")
            try:
                state.measure(conn)
                old, new = _verify(
                    conn, cache, progress, state, pause=pause, yield_ratio=yield_ratio
                )
            finally:
                conn.execute("COMMIT")
            # That read the whole store while mail flowed: catch up with what the journal
            # recorded meanwhile, each round shorter than the one before, so that phase 7 is
            # left with the mail of the last moments only.
            for _ in range(CATCH_UP_ROUNDS):
                changed = journal_take(db)
                if changed is None or not any(changed.values()):
                    break
                copied += _catch_up(
                    conn,
                    cache,
                    state,
                    changed,
                    pause=pause,
                    should_stop=should_stop,
                    progress=progress,
                    yield_ratio=yield_ratio,
                )
                old, new = _verify(
                    conn, cache, progress, state, pause=pause, yield_ratio=yield_ratio
                )
            state_save(conn, state)
            # On disk now, while mail flows, so that finish only syncs what it changes.
            conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchall()
            _fsync(partial_path(root))
        finally:
            cache.close()
            conn.close()
    path = partial_path(root)
    return PrepareResult(
        path=path,
        seconds=round(time.monotonic() - started, 3),
        chunks_copied=copied,
        passes=passes,
        in_sync=old == new,
        counts=new,
        bytes=msgstore.size_on_disk(path),
    )


# --- Switching over --------------------------------------------------------------------------


def checkpoint(db: Path, *, attempts: int = 50) -> int:
    """Copy the store's write-ahead log into the file and empty it, or raise; the number of
    times a reader kept it busy (phase 4 reports it: each costs 100 ms of downtime)."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        for attempt in range(attempts):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return attempt
            time.sleep(0.1)  # a reader holds an old snapshot; pages are short-lived
    finally:
        conn.close()
    raise ApplianceError(f"could not checkpoint {db}: readers keep it busy")


def checkpoint_passive(root: Path | None = None) -> None:
    """Copy what the store's write-ahead log holds into the store without waiting for anyone
    (mail still flows): phase 4's checkpoint, with mail stopped, is then left the last
    moments' pages instead of everything a long read kept in the log."""
    conn = sqlite3.connect(layout(root).msgstore_db, timeout=30, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        conn.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_empty_wal(db: Path) -> None:
    """Remove ``db``'s -wal and -shm once a checkpoint emptied the log, or raise."""
    if msgstore.wal_bytes(db):
        raise ApplianceError(f"{db.name} still has a write-ahead log after a checkpoint")
    for path in msgstore.wal_files(db):
        path.unlink(missing_ok=True)


def _close_partial(root: Path | None) -> Path:
    """Leave the partial as one self-contained, fsynced file (WAL mode in its header)."""
    path = partial_path(root)
    checkpoint(path)
    _drop_empty_wal(path)
    _fsync(path)
    return path


def _swap_in(new_file: Path, db: Path) -> None:
    """Replace the store by ``new_file``: checkpoint the old, drop its log, rename, sync.

    The old store's -wal and -shm belong to the old file; SQLite would replay a leftover log
    into the new one. After the checkpoint the old file holds everything, so removing them
    first keeps it complete if we are killed before the rename.
    """
    if db.exists():
        checkpoint(db)
    _drop_empty_wal(db)
    os.replace(new_file, db)
    fsync_dir(db.parent)


def _stored_result(root: Path | None) -> MigrateResult:
    conn = msgstore.connect(root, readonly=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'migration'").fetchone()
    finally:
        conn.close()
    if row is not None:
        return MigrateResult.from_json(row[0])
    # Created as 2.8.1 rather than converted: nothing to convert, describe it as it is.
    db = layout(root).msgstore_db
    return MigrateResult(
        NEW_FORMAT, 0.0, 0, False, store_counts(root), *(2 * (msgstore.size_on_disk(db),))
    )


def migrate_finish(
    root: Path | None = None, *, progress: ProgressCallback | None = None
) -> MigrateResult:
    """Phase 7, mail stopped: catch up, verify against the old store, switch atomically.

    Copies the chunks that changed since :func:`migrate_prepare` (new mail, purged rows,
    changed retention) or everything if prepare never ran, compares counts and checksums of
    the old store and the new file, and only then renames the new file over the store. A
    mismatch is retried once from a full recount and recopy of the differing chunks, then
    raises :class:`MigrationVerifyError` with the old store untouched. Once the store is
    2.8.1 a rerun returns the stored result.
    """
    started = time.monotonic()
    db = layout(root).msgstore_db
    with conversion_lock(root):
        if msgstore.format_version(root) == NEW_FORMAT:
            return _stored_result(root)
        store_bytes_before = msgstore.size_on_disk(db)
        conn, created = _open_partial(root)
        cache = DigestCache(cache_path(root))
        try:
            if _source_format(conn) != OLD_FORMAT:
                raise ApplianceError(f"the message store is not in format {OLD_FORMAT}")
            full = created
            # Mail is stopped: one pass, and its fingerprints serve the verification too. What
            # phase 2 saved, with the old store's journal of changes since, names the chunks to
            # look at again: the downtime does not read the rest of the store.
            saved = None if created else state_saved(conn)
            changed = journal_chunks(conn) if saved is not None else None
            if saved is not None and changed is not None:
                state = saved
                copied = _catch_up(conn, cache, state, changed, pause=0.0, progress=progress)
            else:
                state = Fingerprinted()
                copied, _ = _sync(
                    conn, pause=0.0, should_stop=None, progress=progress, max_passes=1, state=state
                )
            msgstore.create_indexes(conn)
            old, new = _verify(conn, cache, progress, state)
            if old != new:
                # Trust nothing cached: recount both sides and recopy every differing chunk.
                bare = DigestCache(None)
                differing = []
                for big in CHUNKED_TABLES:
                    _, old_digests = table_digests(conn, "src", big, OLD_FORMAT, bare)
                    _, new_digests = table_digests(
                        conn, "main", big, NEW_FORMAT, bare, tolerant=True
                    )
                    differing += [
                        (big, chunk)
                        for chunk in sorted(old_digests.keys() | new_digests.keys())
                        if old_digests.get(chunk) != new_digests.get(chunk)
                    ]
                more, _ = _sync(
                    conn,
                    pause=0.0,
                    should_stop=None,
                    progress=progress,
                    max_passes=1,
                    force=differing,
                )
                copied += more
                old, new = _verify(conn, bare, progress)
                if old != new:
                    raise MigrationVerifyError(
                        "the converted message store does not match the original: "
                        + ", ".join(k for k in old.tables if old.tables[k] != new.tables.get(k))
                    )
            if progress is not None:
                progress(MigrateProgress("swap", 0, 1))
            result = MigrateResult(
                format_version=NEW_FORMAT,
                seconds=round(time.monotonic() - started, 3),
                chunks_copied=copied,
                full_conversion=full,
                counts=new,
                store_bytes_before=store_bytes_before,
                store_bytes_after=msgstore.size_on_disk(partial_path(root)),
            )
            with msgstore.write_transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO main.meta (key, value) VALUES ('migration', ?)",
                    (result.to_json(),),
                )
                conn.execute("DELETE FROM main.meta WHERE key = ?", (SAVED_STATE,))
        finally:
            cache.close()
            conn.close()
        new_file = _close_partial(root)
        _swap_in(new_file, db)
    if progress is not None:
        progress(MigrateProgress("swap", 1, 1))
    return result


# --- Clean-up --------------------------------------------------------------------------------


def migrate_discard(root: Path | None = None) -> int:
    """Remove the partial file, its logs, leftover temporary copies and the digest cache.

    Returns the bytes freed (phase 9, or an abort). Of the store itself, only the change
    journal goes, from a store still in the 2.8.0 format (appliance.mail.msgjournal).
    """
    directory = layout(root).msgstore_dir
    if not directory.is_dir():
        return 0
    with conversion_lock(root):
        journal_remove(layout(root).msgstore_db)
        victims = [partial_path(root), cache_path(root)]
        victims += [path for base in victims[:] for path in msgstore.wal_files(base)]
        victims += list(directory.glob(".msgstore-restore-*.tmp"))
        freed = 0
        for path in victims:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                freed += size
        if freed:
            fsync_dir(directory)
    return freed
