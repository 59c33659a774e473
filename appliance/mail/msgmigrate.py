"""The message store conversion: phases 2 (prepare) and 7 (finish), either way.

The 2.8.1 upgrade converts the store forward (2.8.0 -> 2.8.1); Return to 2.8.0.0 converts it
back, with the mail that arrived since, by the very same steps: every public function takes
``direction`` (:data:`FORWARD` by default, :data:`BACK` for the way back). What follows says
"old store" for the one being converted and "new file" for the one built beside it.

The guide stops mail for the whole conversion; a million messages took it up to 30 minutes.
Here nearly all of the work happens in phase 2, while mail flows, and the downtime only pays
for what changed since:

- Every big table is cut into chunks of 8,192 ids. A chunk's *fingerprint* (row count, sum of
  ids and of a time and a size column) comes from one GROUP BY at C speed, in either format.
  A chunk whose fingerprints differ between the old store and the new file is (re)copied as a
  whole: that one rule covers mail added since, rows purged since, and a prepare that was
  killed halfway, so every step is simply run again after a crash.
- :func:`migrate_prepare` builds ``msgstore-2.8.1.db.partial`` (``msgstore-2.8.0.db.partial``
  on the way back) next to the store, one chunk per short transaction with a pause after
  each, reading the live store in WAL mode (readers never block the mail service's writer).
  It then digests both sides chunk by chunk, which reads the 2.8.1 bodies, decompresses them
  and checks their SHA-256 (a read-back, as update engines do before switching). On the way
  back the copy itself checks each body's SHA-256 and length as it decompresses it: a damaged
  message stops the conversion with :class:`MalformedApplianceFile`, nothing is switched.
- :func:`migrate_finish` (mail stopped) recopies the few changed chunks, compares counts and
  checksums, and swaps the file in with one rename. It finds those chunks in the old store's
  journal of changes (:mod:`appliance.mail.msgjournal`), not by reading the whole store again,
  so its time follows the mail that came in during phase 2, not the store's size.

Counts, fingerprints and checksums, equal for the same content in either format, are
:mod:`appliance.mail.msgcounts`'s; phase 4's checksummed copy of the store, and putting it back,
:mod:`appliance.mail.msgbackup`'s.

The chunk rules prepare, its catch-up and finish share (what differs, what is copied, what is
verified), in both directions, are :mod:`appliance.mail.msgchunks`'s: one set, so a change
cannot reach one step or one direction and miss another.

Kill safety, both ways: the old store's mail is never written by the conversion (only its
journal triggers and table, added by prepare and dropped by discard); the new file becomes the
store only by ``rename`` after verification, and the old write-ahead log is checkpointed and
removed first (a stale ``-wal`` would otherwise be replayed into the new file). At every
instant the store is the complete old store or the complete verified new one, and prepare or
finish run again go on from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.mail import msgstore
from appliance.mail.msgchunks import (
    BUSY_TIMEOUT_MS,
    MigrateProgress,
    MigrationStopped,
    ProgressCallback,
    catch_up,
    open_partial,
    partial_path,
    source_format,
    sync,
    verify,
)
from appliance.mail.msgcounts import (
    BACK,
    CHUNKED_TABLES,
    FORWARD,
    DigestCache,
    Direction,
    StoreCounts,
    cache_path,
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
from appliance.system.errors import ApplianceError
from appliance.system.paths import layout

__all__ = [
    "BACK",
    "BUSY_TIMEOUT_MS",
    "FORWARD",
    "Direction",
    "MigrateProgress",
    "MigrateResult",
    "MigrationStopped",
    "MigrationVerifyError",
    "PrepareResult",
    "ProgressCallback",
    "checkpoint",
    "checkpoint_passive",
    "conversion_lock",
    "migrate_discard",
    "migrate_finish",
    "migrate_prepare",
    "partial_path",
]

OLD_FORMAT = msgstore.FORMAT_VERSION
NEW_FORMAT = msgstore.FORMAT_2_8_1
# A prepare makes passes until nothing changed during the last; under steady mail the last
# chunk always changes, so it stops after a few and leaves the rest to finish.
MAX_PASSES = 3
# Rounds of catching up with the journal after prepare's verification: each takes about as
# long as the mail the one before saw takes to copy, so two leave phase 7 the last moments.
CATCH_UP_ROUNDS = 2


class MigrationVerifyError(ApplianceError):
    """The new store does not hold what the old one holds; nothing was switched."""


@dataclass(frozen=True)
class PrepareResult:
    """What phase 2 built: the partial file and whether it matched the live store at the end."""

    path: Path
    seconds: float
    chunks_copied: int
    passes: int
    in_sync: bool  # counts and checksum equal at the end (mail arriving makes this False)
    counts: StoreCounts | None  # of the partial file; None when the store was converted already
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


def _lock_path(root: Path | None) -> Path:
    return layout(root).msgstore_dir / ".msgmigrate.lock"


@contextlib.contextmanager
def conversion_lock(root: Path | None) -> Iterator[None]:
    """One conversion step at a time per appliance (the kernel drops it if we are killed)."""
    lock = _lock_path(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock):
        yield


def _open(root: Path | None, direction: Direction) -> tuple[sqlite3.Connection, bool, DigestCache]:
    """The new file (see :func:`appliance.mail.msgchunks.open_partial`), whether it was just
    created, and the digest cache; refuses a store not in ``direction.source``."""
    conn, created = open_partial(root, direction)
    try:
        if source_format(conn) != direction.source:
            raise ApplianceError(f"the message store is not in format {direction.source}")
        cache = DigestCache(cache_path(root))
    except BaseException:
        conn.close()
        raise
    if created:
        # Digests of a file in the target format can only be of another file (the store a
        # conversion the other way replaced): none may stand for the one just created.
        cache.forget_format(direction.target)
    return conn, created, cache


def _open_partial(
    root: Path | None, direction: Direction = FORWARD
) -> tuple[sqlite3.Connection, bool]:
    """The new file with the store attached as ``src`` (for tests that look inside it)."""
    return open_partial(root, direction)


def migrate_prepare(
    root: Path | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    pause: float = 0.0,
    yield_ratio: float = 0.0,
    direction: Direction = FORWARD,
) -> PrepareResult:
    """Phase 2, while mail flows: build the new file next to the store, chunk by chunk.

    Each chunk is one short transaction on the new file, reading the live store through a
    read-only snapshot of its own; ``pause`` seconds after each, or ``yield_ratio`` times the
    chunk's own time, leave the machine to the mail service. Run it again at any time (after a
    kill, or to catch up): it copies only chunks that differ. ``should_stop`` is asked before
    every chunk; True raises :class:`MigrationStopped`, leaving the partial file (resume or
    :func:`migrate_discard`). ``direction``: :data:`FORWARD` (2.8.0 -> 2.8.1, the upgrade) or
    :data:`BACK` (2.8.1 -> 2.8.0, Return to 2.8.0.0).
    """
    started = time.monotonic()
    source = direction.source
    db = layout(root).msgstore_db
    with conversion_lock(root):
        if msgstore.format_version(root) == direction.target:
            return PrepareResult(partial_path(root, direction), 0.0, 0, 0, True, None, 0)
        conn, _, cache = _open(root, direction)
        try:
            # Forget what an earlier run saved before anything changes, then journal the old
            # store's changes from before the first measurement on (appliance.mail.msgjournal).
            state_forget(conn)
            journal_start(db, source)
            copied, passes = sync(
                conn,
                state=Fingerprinted(direction=direction),
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
            journal_clear(db)
            state = Fingerprinted(direction=direction)

            def verified() -> tuple[StoreCounts, StoreCounts]:
                return verify(
                    conn,
                    cache,
                    progress,
                    state,
                    direction=direction,
                    pause=pause,
                    yield_ratio=yield_ratio,
                )

            conn.execute("BEGIN")
            try:
                state.measure(conn)
                old, new = verified()
            finally:
                conn.execute("COMMIT")
            # That read the whole store while mail flowed: catch up with what the journal
            # recorded meanwhile, each round shorter than the one before, so that phase 7 is
            # left with the mail of the last moments only.
            for _ in range(CATCH_UP_ROUNDS):
                changed = journal_take(db, source)
                if changed is None or not any(changed.values()):
                    break
                copied += catch_up(
                    conn,
                    cache,
                    state,
                    changed,
                    pause=pause,
                    should_stop=should_stop,
                    progress=progress,
                    yield_ratio=yield_ratio,
                )
                old, new = verified()
            state_save(conn, state)
            # On disk now, while mail flows, so that finish only syncs what it changes.
            conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchall()
            _fsync(partial_path(root, direction))
        finally:
            cache.close()
            conn.close()
    path = partial_path(root, direction)
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


TRUNCATE_WAIT_MS = 2000  # how long phase 2's truncation waits for the mail service's readers


def checkpoint_passive(root: Path | None = None) -> bool:
    """Copy what the store's write-ahead log holds into the store without waiting for anyone
    (mail still flows), then empty the log file if the readers let it within a moment: phase
    4's checkpoint, with mail stopped, is then left the last moments' pages of a small file,
    instead of everything a long read kept in the log and the freeing of a file that grew to
    gigabytes meanwhile (0.5 s for 1.8 GB). True if the log was emptied. The truncation holds
    the mail service's writers for as long as it takes: in phase 2 that is a delay, not
    downtime."""
    conn = sqlite3.connect(layout(root).msgstore_db, timeout=30, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        conn.execute(f"PRAGMA busy_timeout = {TRUNCATE_WAIT_MS}")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
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


def _close_partial(root: Path | None, direction: Direction) -> Path:
    """Leave the partial as one self-contained, fsynced file (WAL mode in its header)."""
    path = partial_path(root, direction)
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


def _stored_result(root: Path | None, direction: Direction) -> MigrateResult:
    conn = msgstore.connect(root, readonly=True)
    try:
        row = conn.execute(
            "SELECT value FROM meta WHERE key = ?", (direction.result_key,)
        ).fetchone()
    finally:
        conn.close()
    if row is not None:
        return MigrateResult.from_json(row[0])
    # Created in the target format rather than converted: nothing to convert, describe it.
    db = layout(root).msgstore_db
    return MigrateResult(
        direction.target,
        0.0,
        0,
        False,
        store_counts(root),
        *(2 * (msgstore.size_on_disk(db),)),
    )


def migrate_finish(
    root: Path | None = None,
    *,
    progress: ProgressCallback | None = None,
    direction: Direction = FORWARD,
) -> MigrateResult:
    """Phase 7, mail stopped: catch up, verify against the old store, switch atomically.

    Copies the chunks that changed since :func:`migrate_prepare` (new mail, purged rows,
    changed retention) or everything if prepare never ran, compares counts and checksums of
    the old store and the new file, and only then renames the new file over the store. A
    mismatch is retried once from a full recount and recopy of the differing chunks, then
    raises :class:`MigrationVerifyError` with the old store untouched; a damaged 2.8.1 body
    raises :class:`MalformedApplianceFile`, the store untouched too. Once the store is in
    ``direction.target`` a rerun returns the stored result.
    """
    started = time.monotonic()
    db = layout(root).msgstore_db
    source, target = direction.source, direction.target
    with conversion_lock(root):
        if msgstore.format_version(root) == target:
            return _stored_result(root, direction)
        store_bytes_before = msgstore.size_on_disk(db)
        conn, created, cache = _open(root, direction)
        try:
            full = created
            # Mail is stopped: one pass, and its fingerprints serve the verification too. What
            # phase 2 saved, with the old store's journal of changes since, names the chunks to
            # look at again: the downtime does not read the rest of the store.
            saved = None if created else state_saved(conn, direction)
            changed = journal_chunks(conn, "src", source) if saved is not None else None
            if saved is not None and changed is not None:
                state = saved
                copied = catch_up(conn, cache, state, changed, pause=0.0, progress=progress)
            else:
                state = Fingerprinted(direction=direction)
                copied, _ = sync(
                    conn, state=state, pause=0.0, should_stop=None, progress=progress, max_passes=1
                )
            msgstore.create_indexes(conn)
            old, new = verify(conn, cache, progress, state, direction=direction)
            if old != new:
                # Trust nothing cached: recount both sides and recopy every differing chunk.
                bare = DigestCache(None)
                differing = []
                for big in CHUNKED_TABLES:
                    _, old_digests = table_digests(conn, "src", big, source, bare)
                    _, new_digests = table_digests(conn, "main", big, target, bare, tolerant=True)
                    differing += [
                        (big, chunk)
                        for chunk in sorted(old_digests.keys() | new_digests.keys())
                        if old_digests.get(chunk) != new_digests.get(chunk)
                    ]
                more, _ = sync(
                    conn,
                    state=Fingerprinted(direction=direction),
                    pause=0.0,
                    should_stop=None,
                    progress=progress,
                    max_passes=1,
                    force=differing,
                )
                copied += more
                old, new = verify(conn, bare, progress, direction=direction)
                if old != new:
                    raise MigrationVerifyError(
                        "the converted message store does not match the original: "
                        + ", ".join(k for k in old.tables if old.tables[k] != new.tables.get(k))
                    )
            if progress is not None:
                progress(MigrateProgress("swap", 0, 1))
            result = MigrateResult(
                format_version=target,
                seconds=round(time.monotonic() - started, 3),
                chunks_copied=copied,
                full_conversion=full,
                counts=new,
                store_bytes_before=store_bytes_before,
                store_bytes_after=msgstore.size_on_disk(partial_path(root, direction)),
            )
            with msgstore.write_transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO main.meta (key, value) VALUES (?, ?)",
                    (direction.result_key, result.to_json()),
                )
                conn.execute("DELETE FROM main.meta WHERE key = ?", (SAVED_STATE,))
        finally:
            cache.close()
            conn.close()
        new_file = _close_partial(root, direction)
        _swap_in(new_file, db)
    if progress is not None:
        progress(MigrateProgress("swap", 1, 1))
    return result


# --- Clean-up --------------------------------------------------------------------------------


def migrate_discard(root: Path | None = None, *, direction: Direction = FORWARD) -> int:
    """Remove the partial file, its logs, leftover temporary copies and the digest cache.

    Returns the bytes freed (phase 9, or an abort). Of the store itself, only the change
    journal goes, from a store still in ``direction.source`` (appliance.mail.msgjournal).
    """
    directory = layout(root).msgstore_dir
    if not directory.is_dir():
        return 0
    with conversion_lock(root):
        journal_remove(layout(root).msgstore_db, direction.source)
        victims = [partial_path(root, direction), cache_path(root)]
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
