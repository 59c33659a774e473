"""What a message store holds, comparable across its two formats: counts and a checksum.

Every big table is cut into chunks of ``2**CHUNK_BITS`` ids. A chunk's *fingerprint* (row
count, sum of ids and of a time and a size column) comes from one range scan at C speed, in
either format; :class:`ChunkedTable` says how each format spells a table, and how the
conversion copies one of its chunks into either format (:class:`Direction`: forward for the
2.8.1 upgrade, back for the return to 2.8.0).

Checksums are order-independent of the physical rows: each chunk's digest is the SHA-256 of its
rows in id order, written in 2.8.0 terms (a body as the SHA-256 of its raw bytes, an SMTP
status line whole), so both formats of the same content have the same digest (for one
``CHUNK_BITS``, a constant: digests cover a chunk's id range). Digests are cached per chunk
with the fingerprint they were computed at (``msgstore-checksums.db``), so a second count
costs only the fingerprints. The one assumption is the 2.8.0 store's: its rows are inserted and
deleted, never updated in place (nothing in the appliance updates them), so an unchanged
fingerprint means unchanged rows. ``store_counts(cached=False)`` recomputes everything for a
full check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.mail.msgstore import (
    BODY_CODEC,
    FORMAT_2_8_1,
    FORMAT_VERSION,
    connect,
    connection_format,
    decode_body,
    wal_files,
)
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout

CHUNK_BITS = 13  # 8,192 ids a chunk: about 10 MB of bodies, well under 0.1 s to copy


@dataclass(frozen=True)
class Direction:
    """Which way a conversion goes: from the store's format (``source``) to the format of the
    file built beside it (``target``). One set of chunk rules serves both ways, so the way back
    keeps every guarantee of the way there.

    ``result_key``: the ``meta`` key under which the converted store keeps its outcome.
    """

    source: str
    target: str
    result_key: str


FORWARD = Direction(FORMAT_VERSION, FORMAT_2_8_1, "migration")  # the 2.8.1 upgrade
BACK = Direction(FORMAT_2_8_1, FORMAT_VERSION, "reversion")  # Return to 2.8.0.0


def chunk_range(chunk: int) -> tuple[int, int]:
    """The ids of one chunk: ``lo <= id < hi``."""
    return chunk << CHUNK_BITS, (chunk + 1) << CHUNK_BITS


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


def cache_path(root: Path | None) -> Path:
    return layout(root).msgstore_dir / "msgstore-checksums.db"


@dataclass(frozen=True)
class ChunkedTable:
    """One chunked table, as each format spells it."""

    name: str  # the StoreCounts field
    table: dict[str, str]
    key: dict[str, str]
    fingerprint: dict[str, str]  # aggregates, comparable across the formats
    canonical: dict[str, str]  # columns in 2.8.0 terms
    # By target format: INSERT ... SELECT from src (the other format) into main, :lo/:hi bound.
    copy: dict[str, str]


def _both(spelling: str) -> dict[str, str]:
    """A spelling the two formats share."""
    return {FORMAT_VERSION: spelling, FORMAT_2_8_1: spelling}


def _alike(name: str, table: str, fingerprint: str, columns: str) -> ChunkedTable:
    """A table both formats spell alike: keyed by id, copied column for column."""
    return ChunkedTable(
        name=name,
        table=_both(table),
        key=_both("id"),
        fingerprint=_both(fingerprint),
        canonical=_both(columns),
        copy=_both(
            f"INSERT INTO main.{table} ({columns})"  # noqa: S608
            f" SELECT {columns} FROM src.{table} WHERE id >= :lo AND id < :hi"
        ),
    )


_MESSAGE_COLUMNS = (
    "id, store_id, received_at, message_id, sender, recipients, subject, size, verdict"
)


_TRACKING_COLUMNS = (
    "id, logged_at, message_id, sender, recipient, subject, verdict, action, size, quarantine_id"
)


CHUNKED_TABLES = (
    _alike(
        "messages",
        "quarantined_message",
        "count(*), sum(id), sum(received_at), sum(size)",
        _MESSAGE_COLUMNS,
    ),
    ChunkedTable(
        name="bodies",
        table={FORMAT_VERSION: "quarantined_message_raw", FORMAT_2_8_1: "message_body"},
        key=_both("message_id"),
        # No length: reading it from every record costs more than the whole
        # rest of the fingerprints (bodies are inserted and deleted, never changed).
        fingerprint=_both("count(*), sum(message_id)"),
        canonical={
            FORMAT_VERSION: "message_id, raw",
            FORMAT_2_8_1: "message_id, codec, raw_size, sha256, body",
        },
        copy={
            FORMAT_2_8_1: "INSERT INTO main.message_body"  # noqa: S608
            " (message_id, codec, raw_size, sha256, body)"
            f" SELECT message_id, '{BODY_CODEC}', length(raw), mm_sha256(raw),"
            " mm_compress(raw) FROM src.quarantined_message_raw"
            " WHERE message_id >= :lo AND message_id < :hi",
            # mm_raw is verified_body's raw: a body failing its SHA-256 or length stops the
            # copy (never copied as it is).
            FORMAT_VERSION: "INSERT INTO main.quarantined_message_raw (message_id, raw)"
            " SELECT message_id, mm_raw(message_id, codec, raw_size, sha256, body)"
            " FROM src.message_body WHERE message_id >= :lo AND message_id < :hi",
        },
    ),
    ChunkedTable(
        name="smtp_log",
        table=_both("smtp_log"),
        key=_both("id"),
        fingerprint=_both("count(*), sum(id), sum(logged_at)"),
        canonical={
            FORMAT_VERSION: "id, logged_at, client_ip, sender, recipient, response",
            FORMAT_2_8_1: "id, logged_at, client_ip, sender, recipient,"
            " CASE WHEN status IS NULL THEN response ELSE status || ' ' || response END",
        },
        # The same rules as msgstore.split_status and join_status, in SQL so a million rows
        # never reach Python.
        copy={
            FORMAT_2_8_1: "INSERT INTO main.smtp_log (id, logged_at, client_ip, sender,"
            " recipient, status, response) SELECT id, logged_at, client_ip, sender, recipient,"
            " CASE WHEN substr(response, 4, 1) = ' '"
            " AND substr(response, 1, 3) GLOB '[2-5][0-9][0-9]'"
            " THEN CAST(substr(response, 1, 3) AS INTEGER) END,"
            " CASE WHEN substr(response, 4, 1) = ' '"
            " AND substr(response, 1, 3) GLOB '[2-5][0-9][0-9]'"
            " THEN substr(response, 5) ELSE response END"
            " FROM src.smtp_log WHERE id >= :lo AND id < :hi",
            FORMAT_VERSION: "INSERT INTO main.smtp_log (id, logged_at, client_ip, sender,"
            " recipient, response) SELECT id, logged_at, client_ip, sender, recipient,"
            " CASE WHEN status IS NULL THEN response ELSE status || ' ' || response END"
            " FROM src.smtp_log WHERE id >= :lo AND id < :hi",
        },
    ),
    _alike("tracking_log", "tracking_log", "count(*), sum(id), sum(logged_at)", _TRACKING_COLUMNS),
)


# Small tables, digested and (when they differ) copied whole. processing_hour comes after
# processing_minute: the minute table's triggers touch it, then it is copied as it was.
SMALL_TABLES = (
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


def chunk_fingerprint(
    conn: sqlite3.Connection, schema: str, big: ChunkedTable, version: str, chunk: int
) -> tuple[int, ...] | None:
    key = big.key[version]
    row = conn.execute(
        f"SELECT {big.fingerprint[version]} FROM {schema}.{big.table[version]}"  # noqa: S608
        f" WHERE {key} >= ? AND {key} < ?",
        chunk_range(chunk),
    ).fetchone()
    return tuple(int(v or 0) for v in row) if row[0] else None


def chunk_fingerprints(
    conn: sqlite3.Connection, schema: str, big: ChunkedTable, version: str
) -> Fingerprints:
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
        fingerprint = chunk_fingerprint(conn, schema, big, version, chunk)
        if fingerprint is not None:
            result[chunk] = fingerprint
    return result


def verified_body(
    message_id: int, codec: str, raw_size: int, stored_sha: bytes, body: bytes
) -> tuple[bytes, bytes]:
    """(raw message, its SHA-256) of a 2.8.1 body, or raise if it fails its SHA-256 or length:
    the one check every reader of a body in that format makes, the way back's copy too."""
    try:
        raw = decode_body(codec, body)
    except MalformedApplianceFile as exc:
        raise MalformedApplianceFile(f"stored message {message_id}: {exc}") from exc
    actual = hashlib.sha256(raw).digest()
    if actual != bytes(stored_sha) or len(raw) != raw_size:
        raise MalformedApplianceFile(f"stored message {message_id} fails its checksum")
    return raw, actual


def chunk_digest(
    conn: sqlite3.Connection, schema: str, big: ChunkedTable, version: str, chunk: int
) -> bytes:
    """SHA-256 of a chunk's rows in id order, in 2.8.0 terms; checks every 2.8.1 body."""
    key = big.key[version]
    cursor = conn.execute(
        f"SELECT {big.canonical[version]} FROM {schema}.{big.table[version]}"  # noqa: S608
        f" WHERE {key} >= ? AND {key} < ? ORDER BY {key}",
        chunk_range(chunk),
    )
    digest = hashlib.sha256()
    if big.name != "bodies":
        digest.update(repr([tuple(row) for row in cursor]).encode())
        return digest.digest()
    sha256 = hashlib.sha256
    if version == FORMAT_VERSION:
        for message_id, raw in cursor:
            digest.update(repr((message_id, sha256(raw).digest())).encode())
        return digest.digest()
    for message_id, codec, raw_size, stored_sha, body in cursor:
        _, actual = verified_body(message_id, codec, raw_size, stored_sha, body)
        digest.update(repr((message_id, actual)).encode())
    return digest.digest()


class DigestCache:
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
            for stale in (path, *wal_files(path)):
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

    def forget(self, big: ChunkedTable, chunks: set[int]) -> None:
        """Drop the digests of these chunks in both formats: their rows changed in a way a
        fingerprint may not show (an update), so the next count reads them again."""
        if self.conn is None or not chunks:
            return
        key = _cache_key(big)
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "DELETE FROM chunk_digest WHERE tbl = ? AND chunk = ?",
                [(key, chunk) for chunk in sorted(chunks)],
            )
            self.conn.execute("COMMIT")

    def forget_format(self, version: str) -> None:
        """Drop every digest of one format: a conversion's new file in it was just created, so
        no digest cached before (of another file in that format, the one a conversion the
        other way replaced) may stand for it."""
        if self.conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("DELETE FROM chunk_digest WHERE format = ?", (version,))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _cache_key(big: ChunkedTable) -> str:
    """The chunk size is part of the key: a digest covers one chunk's id range."""
    return f"{big.name}/{CHUNK_BITS}"


def table_digests(
    conn: sqlite3.Connection,
    schema: str,
    big: ChunkedTable,
    version: str,
    cache: DigestCache,
    *,
    report: Callable[[bool], None] | None = None,
    tolerant: bool = False,
    fingerprints: Fingerprints | None = None,
) -> tuple[int, dict[int, bytes]]:
    """(row count, chunk -> digest), from the cache where the fingerprint is unchanged.

    ``tolerant``: a chunk with a damaged body gets a digest that matches nothing (so the
    conversion copies it again) instead of raising. ``report(digested)`` is called once for
    every chunk, False when it came from the cache: a progress bar counts both, a caller that
    rests after work only after the first.
    """
    if fingerprints is None:
        fingerprints = chunk_fingerprints(conn, schema, big, version)
    cache_key = _cache_key(big)
    cached = cache.load(version, cache_key)
    digests: dict[int, bytes] = {}
    fresh: list[tuple[int, str, bytes]] = []
    for chunk, fingerprint in sorted(fingerprints.items()):
        fp = ",".join(map(str, fingerprint))
        hit = cached.get(chunk)
        if hit is not None and hit[0] == fp:
            digests[chunk] = hit[1]
            if report is not None:
                report(False)
            continue
        try:
            digests[chunk] = chunk_digest(conn, schema, big, version, chunk)
        except MalformedApplianceFile:
            if not tolerant:
                raise
            digests[chunk] = b"damaged"
            if report is not None:
                report(True)
            continue  # never cached
        fresh.append((chunk, fp, digests[chunk]))
        if report is not None:
            report(True)
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


def small_digest(conn: sqlite3.Connection, schema: str, table: str, columns: str) -> str:
    rows = conn.execute(
        f"SELECT {columns} FROM {schema}.{table} ORDER BY 1"  # noqa: S608
    ).fetchall()
    return hashlib.sha256(repr([tuple(row) for row in rows]).encode()).hexdigest()


def counts_in(
    conn: sqlite3.Connection,
    schema: str,
    version: str,
    cache: DigestCache,
    report: Callable[[bool], None] | None = None,
    tolerant: bool = False,
    fingerprints: dict[str, Fingerprints] | None = None,
) -> StoreCounts:
    counts: dict[str, int] = {}
    tables: dict[str, str] = {}
    for big in CHUNKED_TABLES:
        count, digests = table_digests(
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
    for name, table, columns in SMALL_TABLES:
        tables[name] = small_digest(conn, schema, table, columns)
    for name, table, _ in SMALL_TABLES[:2]:
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
    conn = connect(root, readonly=True)
    conn.row_factory = None  # plain tuples: their repr is what gets hashed
    cache = DigestCache(cache_path(root) if cached else None)
    try:
        return counts_in(conn, "main", connection_format(conn), cache)
    finally:
        cache.close()
        conn.close()
