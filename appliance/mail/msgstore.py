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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import math
import random
import sqlite3
import string
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
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

VERDICTS = ("spam", "virus", "policy", "clean")
ACTIONS = ("delivered", "quarantined", "rejected")

# Tables first, then the indexes later features rely on. The secondary indexes are listed
# separately so a bulk load can drop them and build them once at the end, which is several
# times faster than maintaining them row by row.
_TABLES = """
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
-- processing graphs. One row per minute that saw mail; bytes and processing time are sums so
-- that any roll-up (hour, day) is a plain SUM.
CREATE TABLE IF NOT EXISTS processing_minute (
    minute INTEGER PRIMARY KEY,  -- epoch seconds of the minute's start, UTC
    received INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    virus INTEGER NOT NULL DEFAULT 0,
    spam INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    processing_ms INTEGER NOT NULL DEFAULT 0  -- total over the minute's messages
);

-- The same figures per hour, kept by triggers so that every writer of processing_minute keeps
-- them right without knowing they exist. Graphs of 7 and 30 days read these: 24 times fewer
-- rows than the minutes.
CREATE TABLE IF NOT EXISTS processing_hour (
    hour INTEGER PRIMARY KEY,  -- epoch seconds of the hour's start, UTC
    received INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    virus INTEGER NOT NULL DEFAULT 0,
    spam INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    processing_ms INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER IF NOT EXISTS processing_minute_insert AFTER INSERT ON processing_minute BEGIN
    INSERT INTO processing_hour (
        hour, received, delivered, quarantined, rejected, virus, spam, bytes, processing_ms
    ) VALUES (
        NEW.minute / 3600 * 3600, NEW.received, NEW.delivered, NEW.quarantined, NEW.rejected,
        NEW.virus, NEW.spam, NEW.bytes, NEW.processing_ms
    )
    ON CONFLICT (hour) DO UPDATE SET
        received = received + excluded.received,
        delivered = delivered + excluded.delivered,
        quarantined = quarantined + excluded.quarantined,
        rejected = rejected + excluded.rejected,
        virus = virus + excluded.virus,
        spam = spam + excluded.spam,
        bytes = bytes + excluded.bytes,
        processing_ms = processing_ms + excluded.processing_ms;
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
        if connection_format(conn) == FORMAT_2_8_1:
            row = conn.execute(
                "SELECT codec, sha256, body FROM message_body WHERE message_id = ?",
                (message_id,),
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


def _size_on_disk(db: Path) -> int:
    """Database plus write-ahead log: what the store occupies on its disk right now."""
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


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
    return StoreTotals(messages, smtp_rows, tracking_rows, _size_on_disk(path))


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


# --- Written by the mail service ------------------------------------------------------------

# How long a mail service write waits for another process's write (a retention purge) to finish
# before it fails; the purge works in short batches, so this is a brief wait, not an outage.
BUSY_TIMEOUT_MS = 30_000
# A message store the mail policy names but the database lacks is created with this retention,
# so a quarantine never fails (and a sender never gets an error) for want of its store.
DEFAULT_STORE_RETENTION_DAYS = 30

_UPSERT_MINUTE = """
INSERT INTO processing_minute (minute, received, delivered, quarantined, rejected, virus, spam,
                               bytes, processing_ms)
VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (minute) DO UPDATE SET
    received = received + excluded.received,
    delivered = delivered + excluded.delivered,
    quarantined = quarantined + excluded.quarantined,
    rejected = rejected + excluded.rejected,
    virus = virus + excluded.virus,
    spam = spam + excluded.spam,
    bytes = bytes + excluded.bytes,
    processing_ms = processing_ms + excluded.processing_ms
"""


@dataclass(frozen=True)
class MailRecord:
    """One message the mail service handled, or one recipient it refused, as it is logged.

    A quarantine carries the message store's name and the raw message, which are stored in the
    same transaction as the log rows. Each record counts as one received message in the
    minute's processing figures (a refused recipient is one refused copy of the message).
    """

    logged_at: int  # epoch seconds, UTC
    client_ip: str
    sender: str
    recipients: tuple[str, ...]
    message_id: str
    subject: str
    size: int
    verdict: str
    action: str
    response: str  # the status line the client was answered with
    processing_ms: int = 0
    store_name: str | None = None
    raw: bytes | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS or self.action not in ACTIONS:
            raise ValueError(f"unknown verdict or action: {self.verdict!r}, {self.action!r}")
        if (self.action == "quarantined") != (self.store_name is not None):
            raise ValueError("a quarantined message, and only that, names its message store")
        if (self.store_name is None) != (self.raw is None):
            raise ValueError("a quarantine stores the raw message")
        if not self.recipients:
            raise ValueError("a mail record needs at least one recipient")


def connect_writer(root: Path | None = None) -> sqlite3.Connection:
    """A connection for the mail service's writes, each commit on disk before it returns.

    ``synchronous = FULL`` makes a commit in WAL mode wait for the log's fsync: once the service
    has answered 250 for a quarantined message, neither a crash nor a power cut loses it (see
    :func:`mail_record_many` for the one exception, log rows of messages safe elsewhere).
    Autocommit mode, so transactions are explicit and take the write lock at ``BEGIN
    IMMEDIATE``, where the busy timeout applies (a lock upgrade in mid-transaction would fail
    at once instead of waiting).
    """
    conn = connect(root)
    conn.isolation_level = None
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _store_id(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT id FROM message_store WHERE name = ?", (name,)).fetchone()
    if row is not None:
        return int(row[0])
    cursor = conn.execute(
        "INSERT INTO message_store (name, retention_days) VALUES (?, ?)",
        (name, DEFAULT_STORE_RETENTION_DAYS),
    )
    return int(cursor.lastrowid or 0)


def _write_record(conn: sqlite3.Connection, record: MailRecord, version: str) -> int | None:
    quarantine_id = None
    if record.store_name is not None and record.raw is not None:
        cursor = conn.execute(
            "INSERT INTO quarantined_message (store_id, received_at, message_id, sender,"
            " recipients, subject, size, verdict) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _store_id(conn, record.store_name),
                record.logged_at,
                record.message_id,
                record.sender,
                ", ".join(record.recipients),
                record.subject,
                record.size,
                record.verdict,
            ),
        )
        quarantine_id = cursor.lastrowid
        if version == FORMAT_2_8_1:
            conn.execute(
                "INSERT INTO message_body (message_id, codec, raw_size, sha256, body)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    quarantine_id,
                    BODY_CODEC,
                    len(record.raw),
                    hashlib.sha256(record.raw).digest(),
                    compress_body(record.raw),
                ),
            )
        else:
            conn.execute(
                "INSERT INTO quarantined_message_raw (message_id, raw) VALUES (?, ?)",
                (quarantine_id, record.raw),
            )
    if version == FORMAT_2_8_1:
        status, response = split_status(record.response)
        conn.executemany(
            "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, status, response)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (record.logged_at, record.client_ip, record.sender, recipient, status, response)
                for recipient in record.recipients
            ],
        )
    else:
        conn.executemany(
            "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (record.logged_at, record.client_ip, record.sender, recipient, record.response)
                for recipient in record.recipients
            ],
        )
    conn.executemany(
        "INSERT INTO tracking_log (logged_at, message_id, sender, recipient, subject, verdict,"
        " action, size, quarantine_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                record.logged_at,
                record.message_id,
                record.sender,
                recipient,
                record.subject,
                record.verdict,
                record.action,
                record.size,
                quarantine_id,
            )
            for recipient in record.recipients
        ],
    )
    conn.execute(
        _UPSERT_MINUTE,
        (
            record.logged_at // 60 * 60,
            int(record.action == "delivered"),
            int(record.action == "quarantined"),
            int(record.action == "rejected"),
            int(record.verdict == "virus"),
            int(record.verdict == "spam"),
            record.size,
            record.processing_ms,
        ),
    )
    return quarantine_id


def mail_record_many(conn: sqlite3.Connection, records: list[MailRecord]) -> list[int | None]:
    """Write the records in one transaction (a group commit) and return the quarantine ids.

    ``conn`` comes from :func:`connect_writer`. Either all of the records are written or none.
    A batch holding a quarantine commits with ``synchronous = FULL``: the stored copy is the
    message's only copy, so it is on disk when this returns. A batch of log rows alone (for
    messages already safe in the spool, or refused) commits with ``NORMAL``, which in WAL mode
    survives a crash of the process and reaches the disk with the next FULL commit or
    checkpoint: an fsync per delivered message would buy only log rows against a power cut.
    """
    durable = any(record.store_name is not None for record in records)
    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read inside the transaction: the format of the file this connection has open.
        version = connection_format(conn)
        ids = [_write_record(conn, record, version) for record in records]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return ids


def mail_record(record: MailRecord, root: Path | None = None) -> int | None:
    """Write one record durably on a connection of its own; return its quarantine id."""
    conn = connect_writer(root)
    try:
        return mail_record_many(conn, [record])[0]
    finally:
        conn.close()


# --- Demo data -------------------------------------------------------------------------------

DEMO_STORES = (
    # (name, retention_days, verdict it receives, share of the mail that lands in it)
    ("Spam quarantine", 30, "spam", 0.64),
    ("Virus quarantine", 90, "virus", 0.04),
    ("Policy violations", 60, "policy", 0.10),
    ("Archive", 14, "clean", 0.22),
)
_HISTORY_DAYS = 90
_BATCH = 25_000

_FIRST_NAMES = (
    "anna", "ben", "carla", "david", "elena", "frank", "grace", "henry", "irene", "jack",
    "karin", "lars", "maria", "nils", "olga", "peter", "quinn", "rosa", "stefan", "tanja",
    "uwe", "vera", "walter", "yusuf", "zoe", "amir", "bianca", "chen", "dmitri", "emma",
    "fatima", "george", "hana", "ivan", "julia", "kenji", "lucia", "mohamed", "nora", "oscar",
)  # fmt: skip
_LAST_NAMES = (
    "schmidt", "mueller", "rossi", "garcia", "smith", "johnson", "nguyen", "kowalski",
    "jansen", "dubois", "silva", "novak", "larsen", "tanaka", "kim", "weber", "meyer",
    "fischer", "moreau", "bianchi", "lopez", "brown", "wilson", "taylor", "hoffmann",
    "becker", "wagner", "schulz", "keller", "richter",
)  # fmt: skip
_ROLE_MAILBOXES = ("sales", "support", "info", "hr", "finance", "purchasing", "it-helpdesk")
_INTERNAL_DOMAINS = ("example.com", "eu.example.com")
_PARTNER_DOMAINS = (
    "partner.example.net", "supplier.example.org", "logistics.example", "lawfirm.example",
    "bank.example", "travel.example", "cloudvendor.example", "consulting.example.net",
    "university.example.edu", "news.example.net",
)  # fmt: skip
_SPAM_DOMAINS = (
    "cheap-meds.test", "lucky-winner.test", "promo-deals.test", "crypto-profit.test",
    "dating-match.test", "replica-watches.test", "loan-approval.test", "seo-rank.test",
)  # fmt: skip
_VIRUS_SENDERS = (
    "invoice@billing-dept.test", "noreply@parcel-tracking.test", "scanner@mfp-office.test",
    "payroll@payroll-update.test", "voicemail@unified-msg.test", "accounts@example.com",
    "orders@supplier-portal.test", "security@account-verify.test",
)  # fmt: skip

_SUBJECTS = {
    "spam": (
        "You have won a {money} prize", "Cheap meds - {pct}% off today only",
        "Re: your account verification", "Make {money} a week from home",
        "Limited offer: replica watches {pct}% off", "Your crypto wallet is ready",
        "URGENT: business proposal", "Lose {num} kg in two weeks", "Exclusive deal for {first}",
        "Pre-approved loan of {money}", "Get to page one of Google in {num} days",
        "{first}, someone viewed your profile",
    ),
    "virus": (
        "Invoice {num} overdue", "DHL shipment notification {num}",
        "Scanned document from MFP-{num}", "Payroll update - action required",
        "Voicemail message ({num} sec)", "Order confirmation #{num}",
        "Your account has been suspended", "Remittance advice {num}",
    ),
    "policy": (
        "Q{q} financial results - CONFIDENTIAL", "Customer list export {num}",
        "Salary review {year}", "Site photos (large attachment)", "Project Falcon design documents",
        "FW: contract draft v{q}", "Board minutes {year}-{q}", "Password list for the new servers",
    ),
    "clean": (
        "Meeting notes {year}-{q}", "Re: quarterly review", "Weekly newsletter #{num}",
        "Your order #{num} has shipped", "Lunch on Friday?", "Updated timesheet",
        "Re: support ticket #{num}", "Travel booking confirmation {num}",
        "Invitation: project kick-off", "Re: Re: budget {year}",
    ),
}  # fmt: skip

_TEXT_BODIES = {
    "spam": (
        "Dear friend,\r\n\r\nCongratulations! Your e-mail address was selected in our annual "
        "draw. To claim your prize reply with your full name, address and bank details.\r\n",
        "Best prices online! No prescription needed. Discreet worldwide shipping.\r\n"
        "Order now and save up to 80%.\r\n\r\nTo unsubscribe reply with REMOVE.\r\n",
        "Hello,\r\n\r\nI am a banker and I have a confidential business proposal of mutual "
        "benefit. Kindly reply for more details.\r\n\r\nRegards,\r\nMr. B. Okoro\r\n",
    ),
    "virus": (
        "Please find attached the invoice for your recent order. Payment is overdue; open the "
        "attached document to avoid late fees.\r\n",
        "Your parcel could not be delivered. Print the attached label and take it to the "
        "nearest office.\r\n",
    ),
    "policy": (
        "Hi,\r\n\r\nAttached are the figures we discussed. Please do not forward outside the "
        "company.\r\n\r\nThanks\r\n",
        "As requested, the full export is attached. Let me know if you need more "
        "columns.\r\n",
    ),
    "clean": (
        "Hi all,\r\n\r\nThanks for joining today. Action items are below; please update the "
        "tracker by Friday.\r\n\r\n- finish the migration plan\r\n- book the review room\r\n",
        "Hello,\r\n\r\nYour order has been dispatched and will arrive within 3-5 working days."
        "\r\n\r\nKind regards,\r\nCustomer Service\r\n",
        "Sounds good, see you at 12:30 in the usual place.\r\n",
    ),
}  # fmt: skip

_ATTACHMENTS = {
    "spam": (("offer.html", "text/html"),),
    "virus": (
        ("invoice_0419.zip", "application/zip"),
        ("label.pdf.exe", "application/octet-stream"),
        ("document.docm", "application/vnd.ms-word.document.macroEnabled.12"),
    ),
    "policy": (
        ("customers.csv", "text/csv"),
        ("results-q3.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ("site-photo.jpg", "image/jpeg"),
    ),
    "clean": (("agenda.pdf", "application/pdf"), ("timesheet.xlsx", "application/octet-stream")),
}

# Bytes of attachment before base64: a few hundred bytes to a few KB per message in all.
_ATTACHMENT_SIZES = (200, 900, 400, 2000, 600)


def _body_templates(rng: random.Random) -> dict[str, list[bytes]]:
    """Bodies (MIME headers onward) per verdict: a few dozen, a few hundred bytes to a few KB.

    Built once per fill; the per-message headers are prepended, so a million messages cost a
    million string joins rather than a million MIME serialisations.
    """
    templates: dict[str, list[bytes]] = {}
    for verdict, texts in _TEXT_BODIES.items():
        variants = []
        sizes = itertools.cycle(_ATTACHMENT_SIZES)
        for index, text in enumerate(texts):
            plain = (
                "Content-Type: text/plain; charset=us-ascii\r\n"
                "Content-Transfer-Encoding: 7bit\r\n\r\n" + text
            )
            variants.append(plain.encode("ascii"))
            for filename, content_type in _ATTACHMENTS[verdict]:
                boundary = f"----=_Part_{index}_{rng.randrange(10**9, 10**10)}"
                payload = rng.randbytes(next(sizes))
                encoded = base64.encodebytes(payload).decode("ascii").replace("\n", "\r\n")
                multipart = (
                    f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
                    "This is a multi-part message in MIME format.\r\n\r\n"
                    f"--{boundary}\r\n"
                    "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                    f"{text}\r\n"
                    f"--{boundary}\r\n"
                    f'Content-Type: {content_type}; name="{filename}"\r\n'
                    "Content-Transfer-Encoding: base64\r\n"
                    f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'
                    f"{encoded}\r\n"
                    f"--{boundary}--\r\n"
                )
                variants.append(multipart.encode("ascii"))
        templates[verdict] = variants
    return templates


def _subjects(rng: random.Random, verdict: str, count: int, year: int) -> list[str]:
    patterns = _SUBJECTS[verdict]
    subjects = []
    for _ in range(count):
        subjects.append(
            rng.choice(patterns).format(
                money=f"${rng.choice((500, 1000, 5000, 25000, 1000000)):,}",
                pct=rng.choice((50, 70, 80, 90)),
                num=rng.randrange(100, 99999),
                first=rng.choice(_FIRST_NAMES).title(),
                q=rng.randrange(1, 5),
                year=rng.choice((year - 1, year)),
            )
        )
    return subjects


def _people(rng: random.Random, domains: tuple[str, ...], count: int) -> list[str]:
    people = set()
    while len(people) < count:
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}"))
        people.add(f"{local}@{rng.choice(domains)}")
    return sorted(people)


def _spammers(rng: random.Random, count: int) -> list[str]:
    alphabet = string.ascii_lowercase + string.digits
    locals_ = ("offers", "noreply", "winner", "info", "deals", "newsletter", "support")
    senders = []
    for _ in range(count):
        if rng.random() < 0.5:
            local = rng.choice(locals_)
        else:
            local = "".join(rng.choices(alphabet, k=rng.randrange(5, 11)))
        senders.append(f"{local}@{rng.choice(_SPAM_DOMAINS)}")
    return senders


def _day_prefix(day: int) -> str:
    """``"Tue, 03 Sep 2013 "`` for a day number since the epoch (RFC 5322 date, English)."""
    return datetime.fromtimestamp(day * 86400, tz=UTC).strftime("%a, %d %b %Y ")


def fill_demo(
    root: Path | None = None,
    *,
    messages: int,
    seed: int = 2880,
    now: datetime | None = None,
) -> None:
    """Add ``messages`` realistic messages (plus one SMTP and one tracking log row each).

    The demo and the benchmarks need a store that looks like a busy appliance's: four stores
    with their own retention, each holding mail no older than its retention, denser towards
    ``now``; realistic senders, subjects, sizes and verdicts. The same ``seed`` and ``now``
    give the same rows, so tests can compare.

    Built for a million messages in seconds: batches generated from precomputed templates go
    in with ``executemany``, all in one transaction; the tracking log is derived from the
    inserted messages inside SQLite; for the load only, the journal is kept in memory and
    syncing is off, and (when the load outweighs what is already there) the secondary indexes
    are dropped and built once at the end. A crash in the middle can therefore damage the
    store, which is acceptable for demo data only.
    """
    if messages < 0:
        raise ValueError("messages must not be negative")
    # A store the upgrade already converted is filled in its own format.
    version = format_version(root) if _db_path(root).is_file() else FORMAT_VERSION
    create(root, format_version=version)
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    now_ts = int(now.timestamp())

    conn = connect(root)
    try:
        # Journal and sync settings only change outside a transaction.
        conn.execute("PRAGMA foreign_keys = OFF")  # the generated rows are consistent
        conn.execute("PRAGMA journal_mode = MEMORY")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB, for the index builds
        conn.execute("PRAGMA threads = 2")  # sorter helpers for the index builds
        conn.execute("BEGIN IMMEDIATE")
        try:
            _load(conn, random.Random(seed), messages, now_ts)  # noqa: S311 - demo data
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA analysis_limit = 400")
        conn.execute("ANALYZE")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


@dataclass
class _Pools:
    """What the generator draws from, per verdict in ``DEMO_STORES`` order."""

    verdicts: list[str]
    store_ids: list[int]
    window: list[int]  # seconds of history each store keeps
    verdict_table: list[int]  # verdict indexes in proportion to their share of the mail
    senders: list[list[str]]
    recipients: list[list[str]]
    subjects: list[list[str]]
    bodies: list[list[bytes]]
    client_ips: list[list[str]]


def _pools(rng: random.Random, store_ids: dict[str, int], now_ts: int) -> _Pools:
    verdicts = [verdict for _, _, verdict, _ in DEMO_STORES]
    verdict_table: list[int] = []
    for index, (_, _, _, share) in enumerate(DEMO_STORES):
        verdict_table += [index] * round(share * 100)
    staff = _people(rng, _INTERNAL_DOMAINS, 300) + [
        f"{role}@example.com" for role in _ROLE_MAILBOXES
    ]
    partners = _people(rng, _PARTNER_DOMAINS, 400)
    templates = _body_templates(rng)
    year = datetime.fromtimestamp(now_ts, tz=UTC).year
    # Documentation address ranges only: the internet side is 203.0.113.0/24; the groupware
    # servers that relay outgoing mail sit on eth1's network, 198.51.100.0/24.
    external_ips = [f"203.0.113.{n}" for n in range(2, 255)]
    internal_ips = ["198.51.100.20", "198.51.100.21", "198.51.100.22"]
    return _Pools(
        verdicts=verdicts,
        store_ids=[store_ids[name] for name, _, _, _ in DEMO_STORES],
        window=[min(days, _HISTORY_DAYS) * 86400 for _, days, _, _ in DEMO_STORES],
        verdict_table=verdict_table,
        # Spam from throwaway senders, viruses from a few spoofed ones, policy violations
        # from staff writing out to partners, clean archived mail from partners to staff.
        senders=[_spammers(rng, 1000), list(_VIRUS_SENDERS), staff, partners],
        recipients=[staff, staff, partners, staff],
        subjects=[_subjects(rng, verdict, 150, year) for verdict in verdicts],
        bodies=[templates[verdict] for verdict in verdicts],
        client_ips=[external_ips, external_ips, internal_ips, external_ips],
    )


def _receive_times(rng: random.Random, pools: _Pools, messages: int, now_ts: int) -> list[int]:
    """Sorted ``received_at << 2 | verdict`` keys, so ids grow with time as in a real store.

    Packing both into one int makes the sort of a million keys cheap (no tuples).
    """
    rand = rng.random
    sqrt = math.sqrt
    table = pools.verdict_table
    window = pools.window
    keys = []
    for _ in range(messages):
        verdict = table[int(rand() * len(table))]
        # Density falls linearly from now to the end of the window: recent days are busier.
        age = int(window[verdict] * (1.0 - sqrt(1.0 - rand())))
        keys.append((now_ts - age) << 2 | verdict)
    keys.sort()
    return keys


_Batch = tuple[list[tuple[object, ...]], list[tuple[int, bytes]], list[tuple[object, ...]]]


def _batches(rng: random.Random, pools: _Pools, keys: list[int], first_id: int) -> Iterator[_Batch]:
    """Yield (message rows, raw rows, SMTP log rows) for the messages, ``_BATCH`` at a time.

    The hot loop of the fill: everything per verdict is unpacked from one tuple, times of day
    are formatted once each, and each choice is a single ``random()`` call.
    """
    rand = rng.random
    per_verdict = [
        (
            pools.verdicts[v],
            pools.store_ids[v],
            pools.senders[v],
            [sender.partition("@")[2] for sender in pools.senders[v]],
            len(pools.senders[v]),
            pools.recipients[v],
            len(pools.recipients[v]),
            pools.subjects[v],
            len(pools.subjects[v]),
            pools.bodies[v],
            len(pools.bodies[v]),
            pools.client_ips[v],
            len(pools.client_ips[v]),
        )
        for v in range(len(pools.verdicts))
    ]
    day_prefixes: dict[int, str] = {}
    clock: dict[int, str] = {}  # seconds of the day -> "HH:MM:SS +0000", filled as needed
    for start in range(0, len(keys), _BATCH):
        message_rows: list[tuple[object, ...]] = []
        raw_rows: list[tuple[int, bytes]] = []
        smtp_rows: list[tuple[object, ...]] = []
        for msg_id, key in enumerate(keys[start : start + _BATCH], start=first_id + start):
            received_at = key >> 2
            (
                verdict,
                store_id,
                senders,
                sender_domains,
                n_senders,
                recipients,
                n_recipients,
                subjects,
                n_subjects,
                bodies,
                n_bodies,
                client_ips,
                n_client_ips,
            ) = per_verdict[key & 3]
            pick = int(rand() * n_senders)
            sender = senders[pick]
            recipient = recipients[int(rand() * n_recipients)]
            extra = rand()
            if extra < 0.15:
                all_recipients = recipient + ", " + recipients[int(rand() * n_recipients)]
                if extra < 0.05:
                    all_recipients += ", " + recipients[int(rand() * n_recipients)]
            else:
                all_recipients = recipient
            subject = subjects[int(rand() * n_subjects)]
            body = bodies[int(rand() * n_bodies)]
            client_ip = client_ips[int(rand() * n_client_ips)]
            day, seconds = divmod(received_at, 86400)
            prefix = day_prefixes.get(day)
            if prefix is None:
                prefix = day_prefixes[day] = _day_prefix(day)
            time_of_day = clock.get(seconds)
            if time_of_day is None:
                hour, minute, second = seconds // 3600, seconds // 60 % 60, seconds % 60
                time_of_day = clock[seconds] = f"{hour:02d}:{minute:02d}:{second:02d} +0000"
            date = prefix + time_of_day
            queue_id = f"{(received_at * 7919 + msg_id * 104729) & 0xFFFFFFFFFF:010X}"
            message_id = f"<{received_at:x}.{msg_id:x}@{sender_domains[pick]}>"
            raw = (
                f"Return-Path: <{sender}>\r\n"
                f"Received: from [{client_ip}] ({client_ip})\r\n"
                f"\tby mailsec01.example.com with ESMTP id {queue_id}\r\n"
                f"\tfor <{recipient}>; {date}\r\n"
                f"From: {sender}\r\nTo: {all_recipients}\r\nSubject: {subject}\r\n"
                f"Date: {date}\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
            ).encode("ascii") + body
            # Half the viruses are refused at the end of DATA (a copy is still stored); the
            # tracking log derives its action with the same rule, see _TRACKING_FROM_MESSAGES.
            if verdict == "virus" and msg_id % 2 == 0:
                response = "554 5.7.1 Message rejected: a virus was found in the message"
            else:
                response = "250 2.0.0 Ok: queued as " + queue_id
            message_rows.append(
                (
                    msg_id,
                    store_id,
                    received_at,
                    message_id,
                    sender,
                    all_recipients,
                    subject,
                    len(raw),
                    verdict,
                )
            )
            raw_rows.append((msg_id, raw))
            smtp_rows.append((received_at, client_ip, sender, recipient, response))
        yield message_rows, raw_rows, smtp_rows


# One tracking log row per generated message, derived in SQLite from the message rows (the
# same facts, and much cheaper than binding them all again from Python).
_TRACKING_FROM_MESSAGES = """
INSERT INTO tracking_log (logged_at, message_id, sender, recipient, subject, verdict, action,
                          size, quarantine_id)
SELECT received_at, message_id, sender,
       CASE WHEN instr(recipients, ',') > 0
            THEN substr(recipients, 1, instr(recipients, ',') - 1) ELSE recipients END,
       subject, verdict,
       CASE WHEN verdict = 'clean' THEN 'delivered'
            WHEN verdict = 'virus' AND id % 2 = 0 THEN 'rejected'
            ELSE 'quarantined' END,
       size, id
FROM quarantined_message WHERE id >= ? ORDER BY id
"""


def _load(conn: sqlite3.Connection, rng: random.Random, messages: int, now_ts: int) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO message_store (name, retention_days) VALUES (?, ?)",
        [(name, days) for name, days, _, _ in DEMO_STORES],
    )
    store_ids = dict(conn.execute("SELECT name, id FROM message_store").fetchall())
    (existing,) = conn.execute("SELECT count(*) FROM quarantined_message").fetchone()
    (last_id,) = conn.execute("SELECT coalesce(max(id), 0) FROM quarantined_message").fetchone()
    rebuild = messages > existing
    if rebuild:
        for name in _INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")

    version = connection_format(conn)
    pools = _pools(rng, store_ids, now_ts)
    keys = _receive_times(rng, pools, messages, now_ts)
    for message_rows, raw_rows, smtp_rows in _batches(rng, pools, keys, last_id + 1):
        conn.executemany(
            "INSERT INTO quarantined_message (id, store_id, received_at, message_id,"
            " sender, recipients, subject, size, verdict)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            message_rows,
        )
        if version == FORMAT_2_8_1:
            conn.executemany(
                "INSERT INTO message_body (message_id, codec, raw_size, sha256, body)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        msg_id,
                        BODY_CODEC,
                        len(raw),
                        hashlib.sha256(raw).digest(),
                        compress_body(raw),
                    )
                    for msg_id, raw in raw_rows
                ],
            )
            conn.executemany(
                "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, status, response)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(*row[:4], *split_status(str(row[4]))) for row in smtp_rows],
            )
        else:
            conn.executemany(
                "INSERT INTO quarantined_message_raw (message_id, raw) VALUES (?, ?)", raw_rows
            )
            conn.executemany(
                "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
                " VALUES (?, ?, ?, ?, ?)",
                smtp_rows,
            )
    conn.execute(_TRACKING_FROM_MESSAGES, (last_id + 1,))

    if rebuild:
        for name, columns in _INDEXES.items():
            conn.execute(f"CREATE INDEX {name} ON {columns}")
