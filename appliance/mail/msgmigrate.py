"""The 2.8.1 upgrade's message store conversion: phases 2 (prepare), 4 (backup) and 7 (finish).

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
  checksums, and swaps the file in with one rename.

Checksums are order-independent of the physical rows: each chunk's digest is the SHA-256 of its
rows in id order, written in 2.8.0 terms (a body as the SHA-256 of its raw bytes, an SMTP
status line whole), so both formats of the same content have the same digest (for one
``CHUNK_BITS``, a constant: digests cover a chunk's id range). Digests are
cached per chunk with the fingerprint they were computed at
(``msgstore-checksums.db``), so a second count costs only the fingerprints. The one assumption
is the 2.8.0 store's: its rows are inserted and deleted, never updated in place (nothing in the
appliance updates them), so an unchanged fingerprint means unchanged rows.
``store_counts(cached=False)`` recomputes everything for a full check.

Kill safety: the 2.8.0 file is never written by the conversion; the new file becomes the store
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
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.mail import msgstore
from appliance.system.atomic import atomic_write_text, exclusive_lock, fsync_dir
from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.paths import layout

OLD_FORMAT = msgstore.FORMAT_VERSION
NEW_FORMAT = msgstore.FORMAT_2_8_1
CHUNK_BITS = 13  # 8,192 ids a chunk: about 10 MB of bodies, well under 0.1 s to copy
CHUNK = 1 << CHUNK_BITS
BUSY_TIMEOUT_MS = 30_000
# A prepare makes passes until nothing changed during the last; under steady mail the last
# chunk always changes, so it stops after a few and leaves the rest to finish.
MAX_PASSES = 3
_COPY_BUFFER = 8 * 2**20


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
class StoreCounts:
    """What a message store holds, the same for the same content in either format.

    ``checksum`` is a SHA-256 over every table's digest; ``tables`` has the per-table digests,
    so a mismatch says where.
    """

    messages: int
    bodies: int
    smtp_log: int
    tracking_log: int
    message_stores: int
    processing_minutes: int
    checksum: str
    tables: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StoreCounts:
        return cls(**data)  # type: ignore[arg-type]


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


@dataclass(frozen=True)
class BackupResult:
    """Phase 4's copy of the store; a manifest with the same fields sits at ``path.json``."""

    path: Path
    size: int
    sha256: str
    format_version: str
    counts: StoreCounts
    seconds: float

    @property
    def manifest(self) -> Path:
        return manifest_path(self.path)


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + ".json")


# --- Files -----------------------------------------------------------------------------------


def partial_path(root: Path | None = None) -> Path:
    return layout(root).msgstore_dir / f"msgstore-{NEW_FORMAT}.db.partial"


def _cache_path(root: Path | None) -> Path:
    return layout(root).msgstore_dir / "msgstore-checksums.db"


def _lock_path(root: Path | None) -> Path:
    return layout(root).msgstore_dir / ".msgmigrate.lock"


def _sidecars(db: Path) -> tuple[Path, Path]:
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _store_bytes(db: Path) -> int:
    return _file_size(db) + _file_size(_sidecars(db)[0])


@contextlib.contextmanager
def _locked(root: Path | None) -> Iterator[None]:
    """One conversion step at a time per appliance (the kernel drops it if we are killed)."""
    lock = _lock_path(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock):
        yield


# --- Tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Big:
    """One chunked table, as each format spells it."""

    name: str  # the StoreCounts field
    table: dict[str, str]
    key: dict[str, str]
    fingerprint: dict[str, str]  # aggregates, comparable across the formats
    canonical: dict[str, str]  # columns in 2.8.0 terms
    copy: str  # INSERT ... SELECT from src (2.8.0) into main (2.8.1), :lo/:hi bound


_MESSAGE_COLUMNS = (
    "id, store_id, received_at, message_id, sender, recipients, subject, size, verdict"
)
_TRACKING_COLUMNS = (
    "id, logged_at, message_id, sender, recipient, subject, verdict, action, size, quarantine_id"
)

_BIG = (
    _Big(
        name="messages",
        table={OLD_FORMAT: "quarantined_message", NEW_FORMAT: "quarantined_message"},
        key={OLD_FORMAT: "id", NEW_FORMAT: "id"},
        fingerprint={
            OLD_FORMAT: "count(*), sum(id), sum(received_at), sum(size)",
            NEW_FORMAT: "count(*), sum(id), sum(received_at), sum(size)",
        },
        canonical={OLD_FORMAT: _MESSAGE_COLUMNS, NEW_FORMAT: _MESSAGE_COLUMNS},
        copy=f"INSERT INTO main.quarantined_message ({_MESSAGE_COLUMNS})"  # noqa: S608
        f" SELECT {_MESSAGE_COLUMNS} FROM src.quarantined_message WHERE id >= :lo AND id < :hi",
    ),
    _Big(
        name="bodies",
        table={OLD_FORMAT: "quarantined_message_raw", NEW_FORMAT: "message_body"},
        key={OLD_FORMAT: "message_id", NEW_FORMAT: "message_id"},
        fingerprint={
            # No length: reading it from every record costs more than the whole
            # rest of the fingerprints (bodies are inserted and deleted, never changed).
            OLD_FORMAT: "count(*), sum(message_id)",
            NEW_FORMAT: "count(*), sum(message_id)",
        },
        canonical={
            OLD_FORMAT: "message_id, raw",
            NEW_FORMAT: "message_id, codec, raw_size, sha256, body",
        },
        copy="INSERT INTO main.message_body (message_id, codec, raw_size, sha256, body)"  # noqa: S608
        f" SELECT message_id, '{msgstore.BODY_CODEC}', length(raw), mm_sha256(raw),"
        " mm_compress(raw) FROM src.quarantined_message_raw"
        " WHERE message_id >= :lo AND message_id < :hi",
    ),
    _Big(
        name="smtp_log",
        table={OLD_FORMAT: "smtp_log", NEW_FORMAT: "smtp_log"},
        key={OLD_FORMAT: "id", NEW_FORMAT: "id"},
        fingerprint={
            OLD_FORMAT: "count(*), sum(id), sum(logged_at)",
            NEW_FORMAT: "count(*), sum(id), sum(logged_at)",
        },
        canonical={
            OLD_FORMAT: "id, logged_at, client_ip, sender, recipient, response",
            NEW_FORMAT: "id, logged_at, client_ip, sender, recipient,"
            " CASE WHEN status IS NULL THEN response ELSE status || ' ' || response END",
        },
        # The same rule as msgstore.split_status, in SQL so a million rows never reach Python.
        copy="INSERT INTO main.smtp_log (id, logged_at, client_ip, sender, recipient, status,"
        " response) SELECT id, logged_at, client_ip, sender, recipient,"
        " CASE WHEN substr(response, 4, 1) = ' ' AND substr(response, 1, 3) GLOB '[2-5][0-9][0-9]'"
        " THEN CAST(substr(response, 1, 3) AS INTEGER) END,"
        " CASE WHEN substr(response, 4, 1) = ' ' AND substr(response, 1, 3) GLOB '[2-5][0-9][0-9]'"
        " THEN substr(response, 5) ELSE response END"
        " FROM src.smtp_log WHERE id >= :lo AND id < :hi",
    ),
    _Big(
        name="tracking_log",
        table={OLD_FORMAT: "tracking_log", NEW_FORMAT: "tracking_log"},
        key={OLD_FORMAT: "id", NEW_FORMAT: "id"},
        fingerprint={
            OLD_FORMAT: "count(*), sum(id), sum(logged_at)",
            NEW_FORMAT: "count(*), sum(id), sum(logged_at)",
        },
        canonical={OLD_FORMAT: _TRACKING_COLUMNS, NEW_FORMAT: _TRACKING_COLUMNS},
        copy=f"INSERT INTO main.tracking_log ({_TRACKING_COLUMNS})"  # noqa: S608
        f" SELECT {_TRACKING_COLUMNS} FROM src.tracking_log WHERE id >= :lo AND id < :hi",
    ),
)

# Small tables, digested and (when they differ) copied whole. processing_hour comes after
# processing_minute: the minute table's triggers touch it, then it is copied as it was.
_SMALL = (
    ("message_stores", "message_store", "id, name, retention_days"),
    (
        "processing_minutes",
        "processing_minute",
        "minute, received, delivered, quarantined, rejected, virus, spam, bytes, processing_ms",
    ),
    (
        "processing_hours",
        "processing_hour",
        "hour, received, delivered, quarantined, rejected, virus, spam, bytes, processing_ms",
    ),
)


Fingerprints = dict[int, tuple[int, ...]]


def _chunk_fingerprint(
    conn: sqlite3.Connection, schema: str, big: _Big, version: str, chunk: int
) -> tuple[int, ...] | None:
    key = big.key[version]
    row = conn.execute(
        f"SELECT {big.fingerprint[version]} FROM {schema}.{big.table[version]}"  # noqa: S608
        f" WHERE {key} >= ? AND {key} < ?",
        (chunk << CHUNK_BITS, (chunk + 1) << CHUNK_BITS),
    ).fetchone()
    return tuple(int(v or 0) for v in row) if row[0] else None


def _fingerprints(conn: sqlite3.Connection, schema: str, big: _Big, version: str) -> Fingerprints:
    """Every chunk's fingerprint: one rowid range scan per chunk.

    Several times faster than one GROUP BY over the table, which sorts every row.
    """
    key, table = big.key[version], big.table[version]
    low, high = conn.execute(
        f"SELECT min({key}), max({key}) FROM {schema}.{table}"  # noqa: S608
    ).fetchone()
    if low is None:
        return {}
    result = {}
    for chunk in range(low >> CHUNK_BITS, (high >> CHUNK_BITS) + 1):
        fingerprint = _chunk_fingerprint(conn, schema, big, version, chunk)
        if fingerprint is not None:
            result[chunk] = fingerprint
    return result


def _chunk_digest(
    conn: sqlite3.Connection, schema: str, big: _Big, version: str, chunk: int
) -> bytes:
    """SHA-256 of a chunk's rows in id order, in 2.8.0 terms; checks every 2.8.1 body."""
    key = big.key[version]
    cursor = conn.execute(
        f"SELECT {big.canonical[version]} FROM {schema}.{big.table[version]}"  # noqa: S608
        f" WHERE {key} >= ? AND {key} < ? ORDER BY {key}",
        (chunk << CHUNK_BITS, (chunk + 1) << CHUNK_BITS),
    )
    digest = hashlib.sha256()
    if big.name != "bodies":
        digest.update(repr([tuple(row) for row in cursor]).encode())
        return digest.digest()
    sha256 = hashlib.sha256
    if version == OLD_FORMAT:
        for message_id, raw in cursor:
            digest.update(repr((message_id, sha256(raw).digest())).encode())
        return digest.digest()
    for message_id, codec, raw_size, stored_sha, body in cursor:
        raw = msgstore.decode_body(codec, body)
        actual = sha256(raw).digest()
        if actual != bytes(stored_sha) or len(raw) != raw_size:
            raise MalformedApplianceFile(f"stored message {message_id} fails its checksum")
        digest.update(repr((message_id, actual)).encode())
    return digest.digest()


class _DigestCache:
    """Chunk digests keyed by (format, table, chunk) and valid for one fingerprint.

    A separate small database, so counting a store never writes the store. Losing it costs
    only time; a damaged one is thrown away.
    """

    def __init__(self, path: Path | None) -> None:
        self.conn: sqlite3.Connection | None = None
        if path is None:
            return
        try:
            self.conn = self._open(path)
        except sqlite3.DatabaseError:
            for stale in (path, *_sidecars(path)):
                stale.unlink(missing_ok=True)
            with contextlib.suppress(sqlite3.Error, OSError):
                self.conn = self._open(path)
        except OSError:
            self.conn = None

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS chunk_digest (format TEXT, tbl TEXT, chunk INTEGER,"
            " fingerprint TEXT, digest BLOB, PRIMARY KEY (format, tbl, chunk)) WITHOUT ROWID"
        )
        return conn

    def load(self, version: str, table: str) -> dict[int, tuple[str, bytes]]:
        if self.conn is None:
            return {}
        rows = self.conn.execute(
            "SELECT chunk, fingerprint, digest FROM chunk_digest WHERE format = ? AND tbl = ?",
            (version, table),
        ).fetchall()
        return {int(chunk): (fp, bytes(digest)) for chunk, fp, digest in rows}

    def store(self, version: str, table: str, rows: list[tuple[int, str, bytes]]) -> None:
        if self.conn is None or not rows:
            return
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT OR REPLACE INTO chunk_digest VALUES (?, ?, ?, ?, ?)",
                [(version, table, chunk, fp, digest) for chunk, fp, digest in rows],
            )
            self.conn.execute("COMMIT")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _table_digests(
    conn: sqlite3.Connection,
    schema: str,
    big: _Big,
    version: str,
    cache: _DigestCache,
    *,
    report: Callable[[], None] | None = None,
    tolerant: bool = False,
    fingerprints: Fingerprints | None = None,
) -> tuple[int, dict[int, bytes]]:
    """(row count, chunk -> digest), from the cache where the fingerprint is unchanged.

    ``tolerant``: a chunk with a damaged body gets a digest that matches nothing (so the
    conversion copies it again) instead of raising.
    """
    if fingerprints is None:
        fingerprints = _fingerprints(conn, schema, big, version)
    # The chunk size is part of the key: a digest covers one chunk's id range.
    cache_key = f"{big.name}/{CHUNK_BITS}"
    cached = cache.load(version, cache_key)
    digests: dict[int, bytes] = {}
    fresh: list[tuple[int, str, bytes]] = []
    for chunk, fingerprint in sorted(fingerprints.items()):
        fp = ",".join(map(str, fingerprint))
        hit = cached.get(chunk)
        if hit is not None and hit[0] == fp:
            digests[chunk] = hit[1]
            continue
        try:
            digests[chunk] = _chunk_digest(conn, schema, big, version, chunk)
        except MalformedApplianceFile:
            if not tolerant:
                raise
            digests[chunk] = b"damaged"
            continue  # never cached
        fresh.append((chunk, fp, digests[chunk]))
        if report is not None:
            report()
        if len(fresh) >= 64:
            cache.store(version, cache_key, fresh)
            fresh = []
    cache.store(version, cache_key, fresh)
    return sum(fp[0] for fp in fingerprints.values()), digests


def _combine(digests: dict[int, bytes]) -> str:
    total = hashlib.sha256()
    for chunk, digest in sorted(digests.items()):
        total.update(chunk.to_bytes(8, "big") + digest)
    return total.hexdigest()


def _small_digest(conn: sqlite3.Connection, schema: str, table: str, columns: str) -> str:
    rows = conn.execute(
        f"SELECT {columns} FROM {schema}.{table} ORDER BY 1"  # noqa: S608
    ).fetchall()
    return hashlib.sha256(repr([tuple(row) for row in rows]).encode()).hexdigest()


def _counts(
    conn: sqlite3.Connection,
    schema: str,
    version: str,
    cache: _DigestCache,
    report: Callable[[], None] | None = None,
    tolerant: bool = False,
    fingerprints: dict[str, Fingerprints] | None = None,
) -> StoreCounts:
    counts: dict[str, int] = {}
    tables: dict[str, str] = {}
    for big in _BIG:
        count, digests = _table_digests(
            conn,
            schema,
            big,
            version,
            cache,
            report=report,
            tolerant=tolerant,
            fingerprints=(fingerprints or {}).get(big.name),
        )
        counts[big.name] = count
        tables[big.name] = _combine(digests)
    for name, table, columns in _SMALL:
        tables[name] = _small_digest(conn, schema, table, columns)
    for name, table, _ in _SMALL[:2]:
        (counts[name],) = conn.execute(
            f"SELECT count(*) FROM {schema}.{table}"  # noqa: S608
        ).fetchone()
    checksum = hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()
    return StoreCounts(checksum=checksum, tables=tables, **counts)


def store_counts(root: Path | None = None, *, cached: bool = True) -> StoreCounts:
    """Counts and checksum of the message store in either format (equal across formats).

    ``cached=False`` reads every row (and decompresses every 2.8.1 body); otherwise chunks
    whose fingerprint did not change since they were last digested are taken from the cache.
    """
    conn = msgstore.connect(root, readonly=True)
    conn.row_factory = None  # plain tuples: their repr is what gets hashed
    cache = _DigestCache(_cache_path(root) if cached else None)
    try:
        return _counts(conn, "main", msgstore.connection_format(conn), cache)
    finally:
        cache.close()
        conn.close()


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
            for stale in (path, *_sidecars(path)):
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


@dataclass
class _Fingerprinted:
    """Both sides' fingerprints as of the last pass, kept current for the chunks copied."""

    old: dict[str, Fingerprints] = field(default_factory=dict)
    new: dict[str, Fingerprints] = field(default_factory=dict)

    def measure(self, conn: sqlite3.Connection) -> list[tuple[_Big, int]]:
        """Fingerprint both sides; the chunks that differ."""
        todo = []
        for big in _BIG:
            old = self.old[big.name] = _fingerprints(conn, "src", big, OLD_FORMAT)
            new = self.new[big.name] = _fingerprints(conn, "main", big, NEW_FORMAT)
            todo += [
                (big, chunk)
                for chunk in sorted(old.keys() | new.keys())
                if old.get(chunk) != new.get(chunk)
            ]
        return todo

    def copied(self, conn: sqlite3.Connection, big: _Big, chunk: int) -> None:
        for side, schema, version in (
            (self.old, "src", OLD_FORMAT),
            (self.new, "main", NEW_FORMAT),
        ):
            table = side.setdefault(big.name, {})
            fingerprint = _chunk_fingerprint(conn, schema, big, version, chunk)
            if fingerprint is None:
                table.pop(chunk, None)
            else:
                table[chunk] = fingerprint


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _copy_chunk(conn: sqlite3.Connection, big: _Big, chunk: int) -> None:
    key = big.key[NEW_FORMAT]
    lo, hi = chunk << CHUNK_BITS, (chunk + 1) << CHUNK_BITS
    with _write(conn):
        conn.execute(
            f"DELETE FROM main.{big.table[NEW_FORMAT]} WHERE {key} >= ? AND {key} < ?",  # noqa: S608
            (lo, hi),
        )
        conn.execute(big.copy, {"lo": lo, "hi": hi})


def _copy_small(conn: sqlite3.Connection) -> bool:
    """Copy the small tables that differ; True if any did."""
    changed = [
        (table, columns)
        for _, table, columns in _SMALL
        if _small_digest(conn, "src", table, columns) != _small_digest(conn, "main", table, columns)
    ]
    if not changed:
        return False
    with _write(conn):
        for _, table, columns in _SMALL:  # all three when any differs: the triggers link them
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
    force: list[tuple[_Big, int]] | None = None,
    state: _Fingerprinted | None = None,
) -> tuple[int, int]:
    """Copy every chunk that differs, pass after pass; returns (chunks copied, passes).

    ``state`` receives the fingerprints of both sides as they are at the end: with mail
    stopped, the verification reuses them instead of scanning the tables again. After each
    chunk the copy sleeps ``pause`` seconds or ``yield_ratio`` times as long as the chunk took,
    whichever is longer: a fixed pause is too little on a slow disk and too much on a fast one,
    while a ratio leaves the mail service the same share of the machine on any.
    """
    state = state if state is not None else _Fingerprinted()
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
        small = _copy_small(conn)
        if not todo and not small:
            break
    return copied, passes


def _verify(
    conn: sqlite3.Connection,
    cache: _DigestCache,
    progress: ProgressCallback | None,
    state: _Fingerprinted | None = None,
) -> tuple[StoreCounts, StoreCounts]:
    """(old, new) counts of the attached store and the partial file."""
    done = 0

    def report() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(MigrateProgress("verify", done, 0))

    old = _counts(conn, "src", OLD_FORMAT, cache, report, fingerprints=state and state.old)
    new = _counts(
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
    with _locked(root):
        if msgstore.format_version(root) == NEW_FORMAT:
            return PrepareResult(partial_path(root), 0.0, 0, 0, True, None, 0)
        conn, _ = _open_partial(root)
        cache = _DigestCache(_cache_path(root))
        try:
            if _source_format(conn) != OLD_FORMAT:
                raise ApplianceError(f"the message store is not in format {OLD_FORMAT}")
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
            old, new = _verify(conn, cache, progress)
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
        bytes=_store_bytes(path),
    )


# --- Switching over --------------------------------------------------------------------------


def _checkpoint(db: Path, *, attempts: int = 50) -> None:
    """Copy the store's write-ahead log into the file and empty it, or raise."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        for _ in range(attempts):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.1)  # a reader holds an old snapshot; pages are short-lived
    finally:
        conn.close()
    raise ApplianceError(f"could not checkpoint {db}: readers keep it busy")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_partial(root: Path | None) -> Path:
    """Leave the partial as one self-contained, fsynced file (WAL mode in its header)."""
    path = partial_path(root)
    _checkpoint(path)
    wal, shm = _sidecars(path)
    if _file_size(wal):
        raise ApplianceError(f"{path.name} still has a write-ahead log after a checkpoint")
    wal.unlink(missing_ok=True)
    shm.unlink(missing_ok=True)
    _fsync(path)
    return path


def _swap_in(new_file: Path, db: Path) -> None:
    """Replace the store by ``new_file``: checkpoint the old, drop its log, rename, sync.

    The old store's -wal and -shm belong to the old file; SQLite would replay a leftover log
    into the new one. After the checkpoint the old file holds everything, so removing them
    first keeps it complete if we are killed before the rename.
    """
    if db.exists():
        _checkpoint(db)
    wal, shm = _sidecars(db)
    if _file_size(wal):
        raise ApplianceError(f"{db.name} still has a write-ahead log after a checkpoint")
    wal.unlink(missing_ok=True)
    shm.unlink(missing_ok=True)
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
    return MigrateResult(NEW_FORMAT, 0.0, 0, False, store_counts(root), *(2 * (_store_bytes(db),)))


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
    with _locked(root):
        if msgstore.format_version(root) == NEW_FORMAT:
            return _stored_result(root)
        store_bytes_before = _store_bytes(db)
        conn, created = _open_partial(root)
        cache = _DigestCache(_cache_path(root))
        try:
            if _source_format(conn) != OLD_FORMAT:
                raise ApplianceError(f"the message store is not in format {OLD_FORMAT}")
            full = created
            # Mail is stopped: one pass, and its fingerprints serve the verification too.
            state = _Fingerprinted()
            copied, _ = _sync(
                conn, pause=0.0, should_stop=None, progress=progress, max_passes=1, state=state
            )
            msgstore.create_indexes(conn)
            old, new = _verify(conn, cache, progress, state)
            if old != new:
                # Trust nothing cached: recount both sides and recopy every differing chunk.
                bare = _DigestCache(None)
                differing = []
                for big in _BIG:
                    _, old_digests = _table_digests(conn, "src", big, OLD_FORMAT, bare)
                    _, new_digests = _table_digests(
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
                store_bytes_after=_store_bytes(partial_path(root)),
            )
            with _write(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO main.meta (key, value) VALUES ('migration', ?)",
                    (result.to_json(),),
                )
        finally:
            cache.close()
            conn.close()
        new_file = _close_partial(root)
        _swap_in(new_file, db)
    if progress is not None:
        progress(MigrateProgress("swap", 1, 1))
    return result


# --- Backup, restore, clean-up -----------------------------------------------------------------


def _copy_hashed(
    source: Path, dest_dir: Path, prefix: str, progress: ProgressCallback | None, step: str
) -> tuple[Path, int, str]:
    """Copy to a fsynced temporary file in dest_dir; (temp path, size, sha256 hex)."""
    total = source.stat().st_size
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest_dir)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(_COPY_BUFFER)
    view = memoryview(buffer)
    try:
        with source.open("rb", buffering=0) as src, os.fdopen(fd, "wb", buffering=0) as out:
            while True:
                read = src.readinto(buffer)
                if not read:
                    break
                digest.update(view[:read])
                out.write(view[:read])
                size += read
                if progress is not None:
                    progress(MigrateProgress(step, size, total))
            os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest.hexdigest()


def msgstore_backup(
    dest: Path, root: Path | None = None, *, progress: ProgressCallback | None = None
) -> BackupResult:
    """Phase 4, mail stopped: a consistent, checksummed, fsynced copy of the store at ``dest``.

    The log is checkpointed into the file, then the file is copied while this process holds
    the store's write lock, so nobody can change it mid-copy. The copy and its manifest
    (``dest.json``: size, SHA-256, format, counts) appear by rename; a rerun replaces both.
    """
    started = time.monotonic()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    db = layout(root).msgstore_db
    with _locked(root):
        version = msgstore.format_version(root)
        for _ in range(20):
            _checkpoint(db)
            conn = msgstore.connect(root)
            conn.isolation_level = None
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                if _file_size(_sidecars(db)[0]):
                    continue  # a write slipped in between checkpoint and lock: again
                counts = store_counts(root)
                tmp, size, sha = _copy_hashed(db, dest.parent, f".{dest.name}.", progress, "backup")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
            break
        else:
            raise ApplianceError("the message store kept changing; no consistent backup")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        result = BackupResult(
            path=dest,
            size=size,
            sha256=sha,
            format_version=version,
            counts=counts,
            seconds=round(time.monotonic() - started, 3),
        )
        data = asdict(result)
        data["path"] = str(dest)
        atomic_write_text(manifest_path(dest), json.dumps(data, indent=2, sort_keys=True))
    return result


def read_backup(backup: Path) -> BackupResult:
    """The manifest of a backup made by :func:`msgstore_backup`."""
    manifest = manifest_path(Path(backup))
    try:
        data = json.loads(manifest.read_text())
        data["path"] = Path(backup)
        data["counts"] = StoreCounts.from_json(data["counts"])
        return BackupResult(**data)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MalformedApplianceFile(f"no readable backup manifest at {manifest}: {exc}") from exc


def msgstore_restore(backup: BackupResult | Path, root: Path | None = None) -> None:
    """Roll back: put the phase-4 copy back as the store, after checking its SHA-256.

    The copy is made next to the store and checked while it is written; only a copy that
    matches the manifest replaces the store (rename, directory synced).
    """
    info = backup if isinstance(backup, BackupResult) else read_backup(backup)
    db = layout(root).msgstore_db
    db.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        tmp, size, sha = _copy_hashed(info.path, db.parent, ".msgstore-restore-", None, "restore")
        try:
            if (size, sha) != (info.size, info.sha256):
                raise MalformedApplianceFile(
                    f"message store backup {info.path} does not match its manifest"
                )
            with contextlib.suppress(sqlite3.Error, ApplianceError):
                _checkpoint(db)
            wal, shm = _sidecars(db)
            wal.unlink(missing_ok=True)
            shm.unlink(missing_ok=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, db)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(db.parent)


def migrate_discard(root: Path | None = None) -> int:
    """Remove the partial file, its logs, leftover temporary copies and the digest cache.

    Returns the bytes freed (phase 9, or an abort). Never touches the store itself.
    """
    directory = layout(root).msgstore_dir
    if not directory.is_dir():
        return 0
    with _locked(root):
        victims = [partial_path(root), _cache_path(root)]
        victims += [path for base in victims[:] for path in _sidecars(base)]
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
