"""The message store: quarantined messages, the SMTP log and the message tracking log.

On the appliance this is a database of its own (not the console's), in its own directory so it
can sit on its own disk; the upgrade guide's 50% free-space rule is checked against that disk,
and its retention settings are what an administrator lowers to reclaim space. The 2.8.1 upgrade
converts it to a new format (phases 4 and 7), so the format is recorded in the database itself
(``meta.format_version``) and never inferred from the schema.

Here it is a SQLite database in WAL mode, so the console's pages can read it while a purge or
the mail daemon writes.

Two formats exist, and every reader and writer here works on both:

- 2.8.0: raw messages in ``quarantined_message_raw(message_id, raw)``; ``smtp_log.response``
  holds the whole status line.
- 2.8.1: raw messages in ``message_body(message_id, codec, raw_size, sha256, body)``, zlib
  compressed, with the SHA-256 and length of the raw bytes so a body can be verified after
  decompression; ``smtp_log`` splits the status line into ``status`` (the SMTP code, NULL when
  the line does not start with one) and ``response`` (the rest), which is lossless:
  ``status || ' ' || response`` is the old line. ``PRAGMA user_version`` is 20801.

The conversion is :mod:`appliance.mail.msgmigrate`'s; the format is always read from the file.
What the mail service writes is :mod:`appliance.mail.mailrecords`'s, demo data
:mod:`appliance.mail.demo_store`'s, a stored message's release and deletion
:mod:`appliance.mail.quarantine`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.system.errors import ApplianceError, ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.paths import layout

FORMAT_VERSION = "2.8.0"
FORMAT_2_8_1 = "2.8.1"
FORMATS = (FORMAT_VERSION, FORMAT_2_8_1)
# PRAGMA user_version per format: a cheap header read that tells a writer which tables to use
# (a 2.8.0 store was always created with 0).
USER_VERSIONS = {FORMAT_VERSION: 0, FORMAT_2_8_1: 20801}
BODY_CODEC = "zlib"
# zlib level 1: three to four times faster than the default and within a few per cent of its
# ratio on mail (text and base64).
BODY_LEVEL = 1

# The write-ahead log file is cut back to this size whenever it starts over. Without a limit it
# keeps the largest size it ever reached (gigabytes after a long read held checkpoints back
# while mail flowed), and the next truncating checkpoint pays for freeing it: half a second of
# phase 4's downtime for 1.8 GB here. With it, the writer that starts the log over pays, while
# mail flows.
WAL_SIZE_LIMIT = 64 * 2**20

VERDICTS = ("spam", "virus", "policy", "clean")
ACTIONS = ("delivered", "quarantined", "rejected")

# The processing figures' columns, the same in the minute table and its hourly roll-up.
_FIGURE_COLUMNS = """
    received INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    virus INTEGER NOT NULL DEFAULT 0,
    spam INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    processing_ms INTEGER NOT NULL DEFAULT 0"""

# The processing figures of a conflicting row added to the row it meets: a minute's to its hour
# (the trigger below), a message's to its minute (:data:`UPSERT_MINUTE`).
_ADD_FIGURES = """
        received = received + excluded.received,
        delivered = delivered + excluded.delivered,
        quarantined = quarantined + excluded.quarantined,
        rejected = rejected + excluded.rejected,
        virus = virus + excluded.virus,
        spam = spam + excluded.spam,
        bytes = bytes + excluded.bytes,
        processing_ms = processing_ms + excluded.processing_ms"""

# Tables first, then the indexes later features rely on. The secondary indexes are listed
# separately so a bulk load can drop them and build them once at the end, which is several
# times faster than maintaining them row by row.
_TABLES = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Mail Security > Policy Objects > Message Stores: where quarantined copies go and how long
-- they are kept.
CREATE TABLE IF NOT EXISTS message_store (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    retention_days INTEGER NOT NULL CHECK (retention_days >= 1)
);

-- One stored message. The raw bytes live in quarantined_message_raw so that listing, searching
-- and summing sizes never drag kilobytes of message per row through the page cache.
CREATE TABLE IF NOT EXISTS quarantined_message (
    id INTEGER PRIMARY KEY,
    store_id INTEGER NOT NULL REFERENCES message_store (id),
    received_at INTEGER NOT NULL,  -- epoch seconds, UTC
    message_id TEXT NOT NULL,      -- the RFC 5322 Message-ID, shared with tracking_log
    sender TEXT NOT NULL COLLATE NOCASE,
    recipients TEXT NOT NULL COLLATE NOCASE,  -- comma separated, as in a To: header
    subject TEXT NOT NULL,
    size INTEGER NOT NULL CHECK (size >= 0),  -- length of the raw message in bytes
    -- Spelled with OR, not IN (...): on SQLite 3.40 an IN list in a CHECK costs more than the
    -- rest of the insert.
    verdict TEXT NOT NULL
        CHECK (verdict = 'spam' OR verdict = 'virus' OR verdict = 'policy' OR verdict = 'clean')
);

CREATE TABLE IF NOT EXISTS quarantined_message_raw (
    message_id INTEGER PRIMARY KEY
        REFERENCES quarantined_message (id) ON DELETE CASCADE,
    raw BLOB NOT NULL
);

-- SMTP > Configuration > Maintenance sets this log's retention.
CREATE TABLE IF NOT EXISTS smtp_log (
    id INTEGER PRIMARY KEY,
    logged_at INTEGER NOT NULL,  -- epoch seconds, UTC
    client_ip TEXT NOT NULL,
    sender TEXT NOT NULL COLLATE NOCASE,
    recipient TEXT NOT NULL COLLATE NOCASE,
    response TEXT NOT NULL       -- the status line the appliance answered with
);

-- Mail Security > Policy > Message Tracking / Reporting. quarantine_id points at the stored
-- copy while it is kept; a retention purge deletes the copy but never rewrites the log, so the
-- id may dangle and readers must treat a missing message as "no longer stored".
CREATE TABLE IF NOT EXISTS tracking_log (
    id INTEGER PRIMARY KEY,
    logged_at INTEGER NOT NULL,  -- epoch seconds, UTC
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL COLLATE NOCASE,
    recipient TEXT NOT NULL COLLATE NOCASE,
    subject TEXT NOT NULL,
    verdict TEXT NOT NULL
        CHECK (verdict = 'spam' OR verdict = 'virus' OR verdict = 'policy' OR verdict = 'clean'),
    action TEXT NOT NULL
        CHECK (action = 'delivered' OR action = 'quarantined' OR action = 'rejected'),
    size INTEGER NOT NULL CHECK (size >= 0),
    quarantine_id INTEGER
);

-- Processing figures per minute, written by the mail service as it works and read by the
-- processing graphs. One row per minute that saw mail; bytes and processing time are sums
-- (processing_ms the total over the minute's messages) so that any roll-up (hour, day) is a
-- plain SUM.
CREATE TABLE IF NOT EXISTS processing_minute (
    minute INTEGER PRIMARY KEY,  -- epoch seconds of the minute's start, UTC"""  # noqa: S608 - constant text, no value in it
    + _FIGURE_COLUMNS
    + """
);

-- The same figures per hour, kept by triggers so that every writer of processing_minute keeps
-- them right without knowing they exist. Graphs of 7 and 30 days read these: 24 times fewer
-- rows than the minutes.
CREATE TABLE IF NOT EXISTS processing_hour (
    hour INTEGER PRIMARY KEY,  -- epoch seconds of the hour's start, UTC"""
    + _FIGURE_COLUMNS
    + """
);

CREATE TRIGGER IF NOT EXISTS processing_minute_insert AFTER INSERT ON processing_minute BEGIN
    INSERT INTO processing_hour (
        hour, received, delivered, quarantined, rejected, virus, spam, bytes, processing_ms
    ) VALUES (
        NEW.minute / 3600 * 3600, NEW.received, NEW.delivered, NEW.quarantined, NEW.rejected,
        NEW.virus, NEW.spam, NEW.bytes, NEW.processing_ms
    )
    ON CONFLICT (hour) DO UPDATE SET"""
    + _ADD_FIGURES
    + """;
END;

CREATE TRIGGER IF NOT EXISTS processing_minute_update AFTER UPDATE ON processing_minute BEGIN
    UPDATE processing_hour SET
        received = received + NEW.received - OLD.received,
        delivered = delivered + NEW.delivered - OLD.delivered,
        quarantined = quarantined + NEW.quarantined - OLD.quarantined,
        rejected = rejected + NEW.rejected - OLD.rejected,
        virus = virus + NEW.virus - OLD.virus,
        spam = spam + NEW.spam - OLD.spam,
        bytes = bytes + NEW.bytes - OLD.bytes,
        processing_ms = processing_ms + NEW.processing_ms - OLD.processing_ms
    WHERE hour = NEW.minute / 3600 * 3600;
END;

CREATE TRIGGER IF NOT EXISTS processing_minute_delete AFTER DELETE ON processing_minute BEGIN
    UPDATE processing_hour SET
        received = received - OLD.received,
        delivered = delivered - OLD.delivered,
        quarantined = quarantined - OLD.quarantined,
        rejected = rejected - OLD.rejected,
        virus = virus - OLD.virus,
        spam = spam - OLD.spam,
        bytes = bytes - OLD.bytes,
        processing_ms = processing_ms - OLD.processing_ms
    WHERE hour = OLD.minute / 3600 * 3600;
END;
"""
)

# One message's figures into its minute, as the mail service logs it.
UPSERT_MINUTE = (
    """
INSERT INTO processing_minute (minute, received, delivered, quarantined, rejected, virus, spam,
                               bytes, processing_ms)
VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (minute) DO UPDATE SET"""
    + _ADD_FIGURES
    + "\n"
)

_RAW_280 = """CREATE TABLE IF NOT EXISTS quarantined_message_raw (
    message_id INTEGER PRIMARY KEY
        REFERENCES quarantined_message (id) ON DELETE CASCADE,
    raw BLOB NOT NULL
);"""

_RAW_281 = """CREATE TABLE IF NOT EXISTS message_body (
    message_id INTEGER PRIMARY KEY
        REFERENCES quarantined_message (id) ON DELETE CASCADE,
    codec TEXT NOT NULL CHECK (codec = 'zlib' OR codec = 'identity'),
    raw_size INTEGER NOT NULL CHECK (raw_size >= 0),  -- length of the raw message
    sha256 BLOB NOT NULL CHECK (length(sha256) = 32),  -- of the raw message, not of body
    body BLOB NOT NULL
);"""

_SMTP_280 = """    response TEXT NOT NULL       -- the status line the appliance answered with
);"""

_SMTP_281 = """    status INTEGER,              -- the SMTP reply code; NULL if the line has none
    response TEXT NOT NULL       -- the rest of the status line (all of it without a code)
);"""


def tables_sql(version: str) -> str:
    """The CREATE statements (tables and triggers, no secondary indexes) of one format."""
    if version == FORMAT_VERSION:
        return _TABLES
    if version == FORMAT_2_8_1:
        # Derived from the 2.8.0 text so the tables both formats share cannot drift apart.
        assert _RAW_280 in _TABLES and _SMTP_280 in _TABLES
        return _TABLES.replace(_RAW_280, _RAW_281).replace(_SMTP_280, _SMTP_281)
    raise ApplianceError(f"unknown message store format {version!r}")


# name -> definition. size is in the store index so a store's count and bytes, and a purge by
# age, are answered from the index alone without touching the table.
_INDEXES = {
    "quarantined_message_store_received": "quarantined_message (store_id, received_at, size)",
    "smtp_log_logged_at": "smtp_log (logged_at)",
    "tracking_log_logged_at": "tracking_log (logged_at)",
    "tracking_log_sender": "tracking_log (sender, logged_at)",
    "tracking_log_recipient": "tracking_log (recipient, logged_at)",
    "tracking_log_verdict": "tracking_log (verdict, logged_at)",
}


@dataclass(frozen=True)
class StoreTotals:
    """Row counts and size on disk of the whole message store (Home page)."""

    messages: int
    smtp_log: int
    tracking_log: int
    bytes: int


@dataclass(frozen=True)
class MessageStore:
    """One message store with what it currently holds."""

    id: int
    name: str
    retention_days: int
    message_count: int
    bytes: int


def _db_path(root: Path | None) -> Path:
    return layout(root).msgstore_db


def connect(root: Path | None = None, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the message store (rows as :class:`sqlite3.Row`, foreign keys enforced).

    Never creates the file: a missing store means the appliance was not set up, which callers
    report as :class:`ApplianceNotInitialized` rather than silently getting an empty database.
    ``readonly`` opens it so that a bug in a page that only reads cannot write.
    """
    path = _db_path(root)
    if not path.is_file():
        raise ApplianceNotInitialized(f"no message store at {path}")
    mode = "ro" if readonly else "rw"
    conn = sqlite3.connect(f"{path.as_uri()}?mode={mode}", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


def _stored_format(conn: sqlite3.Connection) -> str | None:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
    return row[0] if row else None


def create(root: Path | None = None, *, format_version: str = FORMAT_VERSION) -> None:
    """Create the message store in a format (2.8.0 by default), or leave such a store as it is.

    Idempotent so setup can run on every start. A store in another format (one the upgrade
    already converted) is refused rather than having the wrong tables grafted onto it.
    """
    create_at(_db_path(root), format_version=format_version)


def create_at(path: Path, *, format_version: str = FORMAT_VERSION, indexes: bool = True) -> None:
    """:func:`create` on an explicit file: the migration builds its new store next to the old.

    ``indexes=False`` leaves the secondary indexes out, for a bulk load that builds them once
    at the end (see :func:`create_indexes`).
    """
    tables = tables_sql(format_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    try:
        stored = _stored_format(conn)
        if stored is not None and stored != format_version:
            raise ApplianceError(
                f"message store {path} is in format {stored}, not {format_version}"
            )
        # Both persistent, and page_size only takes effect before the first table exists.
        # 8 KiB pages waste less space around raw messages of one to a few KiB. WAL lets
        # the console read while the mail daemon or a purge writes.
        conn.execute("PRAGMA page_size = 8192")
        # Incremental auto-vacuum (also only before the first table): a retention purge can
        # hand freed pages back to the disk in small steps instead of one long VACUUM that
        # needs as much free space again as the store and blocks the mail service meanwhile.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        index_sql = _index_sql() if indexes else ""
        # One transaction, so a crash never leaves tables without their format version.
        conn.executescript("BEGIN;\n" + tables + index_sql)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('format_version', ?)",
            (format_version,),
        )
        if USER_VERSIONS[format_version]:
            conn.execute(f"PRAGMA user_version = {USER_VERSIONS[format_version]}")
        conn.commit()
    finally:
        conn.close()


def _index_sql() -> str:
    return "".join(
        f"CREATE INDEX IF NOT EXISTS {name} ON {columns};\n" for name, columns in _INDEXES.items()
    )


def create_indexes(conn: sqlite3.Connection, schema: str = "main") -> None:
    """Build any missing secondary index (same in both formats) on an open connection."""
    for name, columns in _INDEXES.items():
        conn.execute(f"CREATE INDEX IF NOT EXISTS {schema}.{name} ON {columns}")


def drop_indexes(conn: sqlite3.Connection) -> None:
    """Drop the secondary indexes, for a bulk load that builds them once at the end."""
    for name in _INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")


def connection_format(conn: sqlite3.Connection) -> str:
    """The format of the store ``conn`` is open on, from the header (no table read)."""
    (user_version,) = conn.execute("PRAGMA user_version").fetchone()
    return FORMAT_2_8_1 if user_version == USER_VERSIONS[FORMAT_2_8_1] else FORMAT_VERSION


def compress_body(raw: bytes) -> bytes:
    """A raw message as 2.8.1 stores it (codec :data:`BODY_CODEC`)."""
    return zlib.compress(raw, BODY_LEVEL)


def decode_body(codec: str, body: bytes) -> bytes:
    """The raw message back from a 2.8.1 body; refuses a codec it does not know."""
    if codec == "zlib":
        try:
            return zlib.decompress(body)
        except zlib.error as exc:
            raise MalformedApplianceFile(f"a stored message body is damaged: {exc}") from exc
    if codec == "identity":
        return bytes(body)
    raise MalformedApplianceFile(f"unknown message body codec {codec!r}")


def split_status(line: str) -> tuple[int | None, str]:
    """``"250 2.0.0 Ok"`` -> ``(250, "2.0.0 Ok")``; a line without a leading code stays whole.

    The inverse of :func:`join_status`, so the split loses nothing (the SQL in
    :mod:`appliance.mail.msgmigrate` does the same for the bulk conversion).
    """
    code = line[:3]
    if len(line) >= 4 and line[3] == " " and code.isdigit() and code[0] in "2345":
        return int(code), line[4:]
    return None, line


def join_status(status: int | None, response: str) -> str:
    """The status line as 2.8.0 stored it."""
    return response if status is None else f"{status} {response}"


def message_raw(message_id: int, root: Path | None = None) -> bytes | None:
    """The raw bytes of one stored message in either format, None when it is not stored."""
    conn = connect(root, readonly=True)
    try:
        return read_raw(conn, message_id)
    finally:
        conn.close()


def format_version(root: Path | None = None) -> str:
    """The format recorded in the store: what the upgrade checks before converting it."""
    conn = connect(root, readonly=True)
    try:
        version = _stored_format(conn)
    finally:
        conn.close()
    if version is None:
        raise MalformedApplianceFile(f"message store {_db_path(root)} records no format version")
    return version


def wal_files(db: Path) -> tuple[Path, Path]:
    """The write-ahead log and the shared-memory index SQLite keeps beside ``db``."""
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wal_bytes(db: Path) -> int:
    """The size of ``db``'s write-ahead log; 0 when it has none."""
    return _file_size(wal_files(db)[0])


def size_on_disk(db: Path) -> int:
    """Database plus write-ahead log: what the store occupies on its disk right now."""
    return _file_size(db) + wal_bytes(db)


def totals(root: Path | None = None) -> StoreTotals | None:
    """Row counts and size on disk, or None when the appliance has no message store."""
    path = _db_path(root)
    if not path.is_file():
        return None
    conn = connect(root, readonly=True)
    try:
        (messages,) = conn.execute("SELECT count(*) FROM quarantined_message").fetchone()
        (smtp_rows,) = conn.execute("SELECT count(*) FROM smtp_log").fetchone()
        (tracking_rows,) = conn.execute("SELECT count(*) FROM tracking_log").fetchone()
    except sqlite3.DatabaseError as exc:
        # A damaged or foreign file: say so on the page instead of failing it.
        raise MalformedApplianceFile(f"message store {path} cannot be read: {exc}") from exc
    finally:
        conn.close()
    return StoreTotals(messages, smtp_rows, tracking_rows, size_on_disk(path))


def list_stores(root: Path | None = None) -> list[MessageStore]:
    """Every message store with its message count and bytes (sum of message sizes), by id."""
    conn = connect(root, readonly=True)
    try:
        rows = conn.execute(
            """
            SELECT s.id, s.name, s.retention_days,
                   count(m.id) AS message_count, coalesce(sum(m.size), 0) AS bytes
            FROM message_store AS s
            LEFT JOIN quarantined_message AS m ON m.store_id = s.id
            GROUP BY s.id
            ORDER BY s.id
            """
        ).fetchall()
    finally:
        conn.close()
    return [MessageStore(*row) for row in rows]


def read_raw(conn: sqlite3.Connection, message_id: int) -> bytes | None:
    """One stored message's raw bytes in either format (checked against its SHA-256 in
    2.8.1), None when there is no such message."""
    if connection_format(conn) == FORMAT_2_8_1:
        row = conn.execute(
            "SELECT codec, sha256, body FROM message_body WHERE message_id = ?", (message_id,)
        ).fetchone()
        if row is None:
            return None
        raw = decode_body(row[0], row[2])
        if hashlib.sha256(raw).digest() != bytes(row[1]):
            raise MalformedApplianceFile(f"stored message {message_id} fails its checksum")
        return raw
    row = conn.execute(
        "SELECT raw FROM quarantined_message_raw WHERE message_id = ?", (message_id,)
    ).fetchone()
    return None if row is None else bytes(row[0])


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on a connection in autocommit mode, rolled back on any error:
    SQLite's one writer at a time, taken at the start so a read inside cannot go stale."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
