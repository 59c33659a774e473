"""What the mail service writes into the message store: one record per message it handled.

A record's quarantined copy, its SMTP and tracking log rows and the minute's processing figures
go in in one transaction, in whichever format the store is in, durably when the message's only
copy is at stake (see :func:`mail_record_many`).
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from appliance.mail.msgstore import (
    ACTIONS,
    BODY_CODEC,
    FORMAT_2_8_1,
    UPSERT_MINUTE,
    VERDICTS,
    compress_body,
    connect,
    connection_format,
    split_status,
)

# How long a mail service write waits for another process's write (a retention purge) to finish
# before it fails; the purge works in short batches, so this is a brief wait, not an outage.
BUSY_TIMEOUT_MS = 30_000

# A message store the mail policy names but the database lacks is created with this retention,
# so a quarantine never fails (and a sender never gets an error) for want of its store.
DEFAULT_STORE_RETENTION_DAYS = 30


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
        UPSERT_MINUTE,
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
