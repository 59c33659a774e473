"""The quarantine: one stored message, its release (delivered on, once) and its deletion.

Mail Security's message detail page reads one stored message (:func:`quarantined_copies`); an
administrator releases it or deletes it. The message store itself (its formats, connections
and bodies) is :mod:`appliance.mail.msgstore`'s; this module adds the release record and the
two writes an administrator makes, each one write transaction on the store.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.mail import msgstore
from appliance.system.errors import ApplianceError

# --- Quarantine: one stored message, its release and its deletion ---------------------------
# Mail Security's message detail page reads one stored message; an administrator releases it
# (delivers it on, once) or deletes it. A release is recorded in a table of its own, made the
# first time anything is released, so that the mail service's schema need not know about it
# (the conversion copies it either way: msgchunks.copy_releases); a deleted or purged message
# takes its record with it (ON DELETE CASCADE).

RELEASE_TABLE_SQL = """CREATE TABLE IF NOT EXISTS quarantine_release (
    message_id INTEGER PRIMARY KEY
        REFERENCES quarantined_message (id) ON DELETE CASCADE,
    state TEXT NOT NULL CHECK (state = 'releasing' OR state = 'released'),
    started_at INTEGER NOT NULL,  -- epoch seconds, UTC: when the release was claimed
    released_at INTEGER,          -- when the next hop (or the local sink) took it
    released_by TEXT NOT NULL,
    queue_id TEXT NOT NULL DEFAULT ''  -- its spool file's, so a resumed release finds it
)"""
RELEASING = "releasing"
RELEASED = "released"


class QuarantineError(ApplianceError):
    """A release or a deletion the message store refused; the message says why."""


@dataclass(frozen=True)
class QuarantinedCopy:
    """One stored message as the detail page and the confirmation pages show it.

    release_state is "" (never released), "releasing" (a release is delivering it now, or was
    interrupted) or "released".
    """

    id: int
    store_id: int
    store_name: str
    received_at: int  # epoch seconds, UTC
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    size: int
    verdict: str
    release_state: str = ""
    released_at: int | None = None
    released_by: str = ""

    @property
    def held(self) -> bool:
        """Held back from its recipients: a clean message's copy (the Archive store) was
        delivered when it arrived, so releasing it would only deliver it twice."""
        return self.verdict != "clean"


@dataclass(frozen=True)
class ReleaseClaim:
    """A message claimed for release: its envelope and raw bytes, to be delivered on."""

    copy: QuarantinedCopy
    raw: bytes


@dataclass(frozen=True)
class ClaimOutcome:
    """What claiming each asked-for message gave: the claims, and why the others were not."""

    claimed: tuple[ReleaseClaim, ...]
    released_already: tuple[int, ...]  # released (or being), or delivered when it arrived
    not_stored: tuple[int, ...]  # deleted or purged by retention (or never existed)


def split_recipients(text: str) -> tuple[str, ...]:
    """The recipients column ("a@x, b@y", as in a To: header) as addresses."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def has_release_table(conn: sqlite3.Connection, schema: str = "main") -> bool:
    """Whether anything was ever released from this store (``schema``: an attached one)."""
    return (
        conn.execute(
            f"SELECT 1 FROM {schema}.sqlite_schema"  # noqa: S608
            " WHERE type = 'table' AND name = 'quarantine_release'"
        ).fetchone()
        is not None
    )


def _copies(conn: sqlite3.Connection, ids: list[int]) -> dict[int, QuarantinedCopy]:
    """The stored messages among ids, with their store and release (one query per 500 ids)."""
    release = has_release_table(conn)
    columns = "r.state, r.released_at, r.released_by" if release else "NULL, NULL, ''"
    join = "LEFT JOIN quarantine_release AS r ON r.message_id = m.id" if release else ""
    found: dict[int, QuarantinedCopy] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT m.id, m.store_id, s.name, m.received_at, m.message_id, m.sender,"  # noqa: S608
            f" m.recipients, m.subject, m.size, m.verdict, {columns}"
            f" FROM quarantined_message AS m JOIN message_store AS s ON s.id = m.store_id"
            f" {join} WHERE m.id IN ({marks})",
            chunk,
        ).fetchall()
        for row in rows:
            found[row[0]] = QuarantinedCopy(
                id=row[0],
                store_id=row[1],
                store_name=row[2],
                received_at=row[3],
                message_id=row[4],
                sender=row[5],
                recipients=split_recipients(row[6]),
                subject=row[7],
                size=row[8],
                verdict=row[9],
                release_state=row[10] or "",
                released_at=row[11],
                released_by=row[12] or "",
            )
    return found


def _asked_for(
    conn: sqlite3.Connection, ids: list[int]
) -> tuple[list[QuarantinedCopy], tuple[int, ...]]:
    """The stored copies of the ids an administrator picked, each once and in the order picked,
    and the ids no longer stored (purged or deleted already): a release or a deletion acts on
    the first and reports the second, not as an error."""
    wanted = list(dict.fromkeys(ids))
    copies = _copies(conn, wanted)
    stored = [copies[message_id] for message_id in wanted if message_id in copies]
    return stored, tuple(message_id for message_id in wanted if message_id not in copies)


def quarantined_copies(ids: list[int], root: Path | None = None) -> dict[int, QuarantinedCopy]:
    """The stored messages among ids, by id; a missing id is no longer (or never was) stored."""
    conn = msgstore.connect(root, readonly=True)
    try:
        return _copies(conn, list(dict.fromkeys(ids)))
    finally:
        conn.close()


@contextlib.contextmanager
def _writing(root: Path | None) -> Iterator[sqlite3.Connection]:
    """One write transaction on the store, waiting for the mail service's and a purge's writes
    (both short) rather than failing; the connection is closed after."""
    conn = msgstore.connect(root)
    conn.isolation_level = None
    conn.execute("PRAGMA busy_timeout = 30000")
    try:
        with msgstore.write_transaction(conn):
            yield conn
    finally:
        conn.close()


def quarantine_release_claim(
    ids: list[int],
    *,
    by: str,
    now: int,
    queue_ids: Mapping[int, str] | None = None,
    root: Path | None = None,
) -> ClaimOutcome:
    """Claim messages for release in one transaction; each is claimed at most once, ever.

    The claim is the insert of the message's release record: a second release (another
    administrator, a double click, a second tab) finds the record and is refused, whatever it
    read before. A message that is no longer stored (purged by retention, deleted) is reported
    and nothing is written for it.
    """
    with _writing(root) as conn:
        conn.execute(RELEASE_TABLE_SQL)
        stored, missing = _asked_for(conn, ids)
        claimed: list[ReleaseClaim] = []
        already: list[int] = []
        for copy in stored:
            if not copy.held:  # delivered when it arrived: nothing to release
                already.append(copy.id)
                continue
            inserted = conn.execute(
                "INSERT INTO quarantine_release"
                " (message_id, state, started_at, released_by, queue_id)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING",
                (copy.id, RELEASING, now, by, (queue_ids or {}).get(copy.id, "")),
            ).rowcount
            raw = msgstore.read_raw(conn, copy.id) if inserted else None
            if not inserted:
                already.append(copy.id)
            elif raw is None:  # a row without its body: nothing that could be delivered
                raise QuarantineError(f"stored message {copy.id} has no body")
            else:
                claimed.append(ReleaseClaim(copy, raw))
    return ClaimOutcome(tuple(claimed), tuple(already), missing)


def quarantine_release_claimed(
    queue_ids: Mapping[int, str], root: Path | None = None
) -> list[ReleaseClaim]:
    """The messages still claimed under these spool queue ids (a release's own claims, which
    its process died holding), with their bodies, for the release to go on with."""
    if not queue_ids:
        return []
    conn = msgstore.connect(root, readonly=True)
    try:
        if not has_release_table(conn):
            return []
        copies = _copies(conn, list(queue_ids))
        mine = {
            row[0]
            for row in conn.execute(
                "SELECT message_id, queue_id FROM quarantine_release WHERE state = ?",
                (RELEASING,),
            )
            if queue_ids.get(row[0]) == row[1] and row[1]
        }
        claims = []
        for message_id in queue_ids:
            raw = msgstore.read_raw(conn, message_id) if message_id in mine else None
            if raw is not None and message_id in copies:
                claims.append(ReleaseClaim(copies[message_id], raw))
        return claims
    finally:
        conn.close()


def quarantine_release_finish(ids: list[int], *, now: int, root: Path | None = None) -> list[int]:
    """Mark claimed messages released (delivered on); returns those that were still claimed.

    Conditional on the claim (state 'releasing'): a message deleted meanwhile stays deleted.
    """
    if not ids:
        return []
    with _writing(root) as conn:
        return [
            message_id
            for message_id in ids
            if conn.execute(
                "UPDATE quarantine_release SET state = ?, released_at = ?"
                " WHERE message_id = ? AND state = ?",
                (RELEASED, now, message_id, RELEASING),
            ).rowcount
        ]


def quarantine_release_abandon(ids: list[int], root: Path | None = None) -> None:
    """Drop the claims of messages the next hop did not take, so they can be released again."""
    if not ids:
        return
    with _writing(root) as conn:
        conn.executemany(
            "DELETE FROM quarantine_release WHERE message_id = ? AND state = ?",
            [(message_id, RELEASING) for message_id in ids],
        )


@dataclass(frozen=True)
class DeleteOutcome:
    """What deleting each asked-for message gave."""

    deleted: tuple[QuarantinedCopy, ...]
    releasing: tuple[int, ...]  # a release is delivering it right now: left alone
    not_stored: tuple[int, ...]  # deleted or purged already


def quarantine_delete(ids: list[int], root: Path | None = None) -> DeleteOutcome:
    """Delete stored messages (row, body and release record) in one transaction.

    A message being released right now is left alone (its release would otherwise finish on
    a message that no longer exists); a message already gone is reported, not an error.
    """
    with _writing(root) as conn:
        stored, missing = _asked_for(conn, ids)
        deleted: list[QuarantinedCopy] = []
        releasing: list[int] = []
        for copy in stored:
            if copy.release_state == RELEASING:
                releasing.append(copy.id)
                continue
            # The body tables and the release record go with it (ON DELETE CASCADE).
            conn.execute("DELETE FROM quarantined_message WHERE id = ?", (copy.id,))
            deleted.append(copy)
    return DeleteOutcome(tuple(deleted), tuple(releasing), missing)
