"""Which chunks of the message store changed since the conversion measured them.

Phase 7 runs with mail stopped, and whatever it reads counts as downtime. Finding what changed
since phase 2 by fingerprinting every chunk of the old store reads the whole store again: the
downtime would grow with it. Instead, while the conversion runs, the old store keeps a journal
of its own changes: triggers on its big tables (:data:`appliance.mail.msgcounts.CHUNKED_TABLES`)
record the chunk of every row inserted, deleted or updated, in the same transaction as the
change, whichever process writes it (the mail service, a release, a purge). Phase 7 then looks
again only at those chunks, and trusts phase 2's fingerprints and digests for the rest.

The journal is started (emptied) when :func:`appliance.mail.msgmigrate.migrate_prepare`
begins, before it measures anything, so every change after a measurement is in it. It is read
through the conversion's read-only attachment of the old store (``src``). It is removed from a
store that stays 2.8.0 (an abort, a rollback: :func:`journal_remove`); a store switched to
2.8.1 is a new file without it, and the old file, kept for the rollback, goes with the
install's work folder. It catches more than fingerprints do: an update that keeps a chunk's
row count and sums is journaled too.

What phase 2 measured last (:class:`Fingerprinted`, both files from one snapshot) is saved in
the new file's ``meta`` (:func:`state_save`) and forgotten before a prepare changes anything
(:func:`state_forget`): phase 7 trusts it only with a journal started before it was measured.
Without either (a prepare killed halfway, a store restored from an old image), phase 7
measures everything, as slow as before and as safe.

The way back (Return to 2.8.0.0, :data:`appliance.mail.msgcounts.BACK`) journals the 2.8.1
store the same way: every function takes the conversion's source format (or its
:class:`~appliance.mail.msgcounts.Direction`), 2.8.0 by default, and the triggers are made for
that format's table names. "Old" here is always the store being converted, "new" the file
built beside it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from appliance.mail import msgcounts, msgstore
from appliance.mail.msgcounts import (
    CHUNKED_TABLES,
    FORWARD,
    ChunkedTable,
    Direction,
    Fingerprints,
    chunk_fingerprint,
    chunk_fingerprints,
)

OLD_FORMAT = msgstore.FORMAT_VERSION

JOURNAL = "mm_changed"
BUSY_TIMEOUT_MS = 30_000
_EVENTS = (("insert", ("NEW",)), ("delete", ("OLD",)), ("update", ("OLD", "NEW")))


def _triggers(source: str = OLD_FORMAT) -> list[tuple[str, str]]:
    """(name, CREATE statement) of every journal trigger on the tables of a store in format
    ``source``, for the chunk size in force (read at the call: the statements are compared
    with the stored ones)."""
    bits = msgcounts.CHUNK_BITS
    made = []
    for big in CHUNKED_TABLES:
        table, key = big.table[source], big.key[source]
        for event, rows in _EVENTS:
            name = f"{JOURNAL}_{table}_{event}"
            body = " ".join(
                f"INSERT OR IGNORE INTO {JOURNAL} (tbl, chunk)"  # noqa: S608 - our constants
                f" VALUES ('{big.name}', {row}.{key} >> {bits});"
                for row in rows
            )
            made.append(
                (
                    name,
                    f"CREATE TRIGGER {name} AFTER {event.upper()} ON {table} BEGIN {body} END",
                )
            )
    return made


def _writer(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=rw", uri=True, timeout=30, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def journal_start(db: Path, source: str = OLD_FORMAT) -> None:
    """Triggers in place and the journal emptied, in one transaction on the old store (in
    format ``source``): from its commit on, every change to a big table leaves its chunk here."""
    conn = _writer(db)
    try:
        with msgstore.write_transaction(conn):
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {JOURNAL} (tbl TEXT NOT NULL, chunk INTEGER NOT NULL,"
                " PRIMARY KEY (tbl, chunk)) WITHOUT ROWID"
            )
            for name, create in _triggers(source):
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")  # made for another chunk size
                conn.execute(create)
            conn.execute(f"DELETE FROM {JOURNAL}")  # noqa: S608
    finally:
        conn.close()


def journal_clear(db: Path) -> None:
    """Empty the journal, just before a measurement that sees everything it held: what is
    journaled from then on is what changed after that measurement (or during it)."""
    conn = _writer(db)
    try:
        with msgstore.write_transaction(conn):
            conn.execute(f"DELETE FROM {JOURNAL}")  # noqa: S608
    finally:
        conn.close()


def journal_chunks(
    conn: sqlite3.Connection, schema: str = "src", source: str = OLD_FORMAT
) -> dict[str, set[int]] | None:
    """The chunks changed since :func:`journal_start`, by table name; None when this store has
    no complete journal (no table, a trigger missing or made for another chunk size or format):
    then nothing may be trusted."""
    stored = dict(
        conn.execute(
            f"SELECT name, sql FROM {schema}.sqlite_schema WHERE type IN ('table', 'trigger')"  # noqa: S608
            f" AND name LIKE '{JOURNAL}%'"
        ).fetchall()
    )
    if JOURNAL not in stored or any(stored.get(name) != sql for name, sql in _triggers(source)):
        return None
    changed: dict[str, set[int]] = {big.name: set() for big in CHUNKED_TABLES}
    for table, chunk in conn.execute(f"SELECT tbl, chunk FROM {schema}.{JOURNAL}"):  # noqa: S608
        changed.setdefault(table, set()).add(int(chunk))
    return changed


def journal_take(db: Path, source: str = OLD_FORMAT) -> dict[str, set[int]] | None:
    """:func:`journal_chunks` and empty the journal, in one transaction on the old store (no
    change can fall between the two): for a catch-up round while mail flows. None as there."""
    conn = _writer(db)
    try:
        with msgstore.write_transaction(conn):
            changed = journal_chunks(conn, "main", source)
            if changed is not None:
                conn.execute(f"DELETE FROM {JOURNAL}")  # noqa: S608
        return changed
    finally:
        conn.close()


def journal_remove(db: Path, source: str = OLD_FORMAT) -> None:
    """Triggers and journal gone from a store that stays in the ``source`` format (a store
    switched to the other format is a new file without them)."""
    if not db.is_file():
        return
    conn = _writer(db)
    try:
        if msgstore.connection_format(conn) != source:
            return
        with msgstore.write_transaction(conn):
            for name, _ in _triggers(source):
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")
            conn.execute(f"DROP TABLE IF EXISTS {JOURNAL}")
    finally:
        conn.close()


# --- What phase 2 measured -------------------------------------------------------------------


@dataclass
class Fingerprinted:
    """Both sides' fingerprints as of the last pass, kept current for the chunks copied:
    ``old`` of the store (``src``, in ``direction.source``), ``new`` of the file built."""

    old: dict[str, Fingerprints] = field(default_factory=dict)
    new: dict[str, Fingerprints] = field(default_factory=dict)
    direction: Direction = FORWARD

    def measure(self, conn: sqlite3.Connection) -> list[tuple[ChunkedTable, int]]:
        """Fingerprint both sides; the chunks that differ."""
        source, target = self.direction.source, self.direction.target
        todo = []
        for big in CHUNKED_TABLES:
            old = self.old[big.name] = chunk_fingerprints(conn, "src", big, source)
            new = self.new[big.name] = chunk_fingerprints(conn, "main", big, target)
            todo += [
                (big, chunk)
                for chunk in sorted(old.keys() | new.keys())
                if old.get(chunk) != new.get(chunk)
            ]
        return todo

    def copied(self, conn: sqlite3.Connection, big: ChunkedTable, chunk: int) -> None:
        for side, schema, version in (
            (self.old, "src", self.direction.source),
            (self.new, "main", self.direction.target),
        ):
            table = side.setdefault(big.name, {})
            fingerprint = chunk_fingerprint(conn, schema, big, version, chunk)
            if fingerprint is None:
                table.pop(chunk, None)
            else:
                table[chunk] = fingerprint

    def journaled(
        self, conn: sqlite3.Connection, changed: dict[str, set[int]]
    ) -> list[tuple[ChunkedTable, int]]:
        """Fingerprint again only the old store's chunks its journal names (the rest, and the
        new file, which nothing but the conversion writes, are as saved); the chunks to copy:
        every journaled one (an update may leave its fingerprint as it was) and any other
        that differs."""
        todo = []
        for big in CHUNKED_TABLES:
            old = self.old.setdefault(big.name, {})
            new = self.new.setdefault(big.name, {})
            journaled = changed.get(big.name, set())
            for chunk in journaled:
                fingerprint = chunk_fingerprint(conn, "src", big, self.direction.source, chunk)
                if fingerprint is None:
                    old.pop(chunk, None)
                else:
                    old[chunk] = fingerprint
            todo += [
                (big, chunk)
                for chunk in sorted(old.keys() | new.keys() | journaled)
                if chunk in journaled or old.get(chunk) != new.get(chunk)
            ]
        return todo

    def to_json(self) -> str:
        return json.dumps(
            {
                side: {name: {str(c): list(f) for c, f in t.items()} for name, t in prints.items()}
                for side, prints in (("old", self.old), ("new", self.new))
            }
        )

    @classmethod
    def from_json(cls, text: str, direction: Direction = FORWARD) -> Fingerprinted:
        """The saved state of a file built in ``direction`` (the file's name and format say
        which, so the direction itself is not saved)."""
        data = json.loads(text)
        sides = [
            {name: {int(c): tuple(fp) for c, fp in t.items()} for name, t in data[side].items()}
            for side in ("old", "new")
        ]
        return cls(old=sides[0], new=sides[1], direction=direction)


SAVED_STATE = "migration_fingerprints"  # main.meta key: both sides as prepare left them


def state_forget(conn: sqlite3.Connection) -> None:
    """Before a prepare changes anything: the saved state no longer describes the files."""
    with msgstore.write_transaction(conn):
        conn.execute("DELETE FROM main.meta WHERE key = ?", (SAVED_STATE,))


def state_save(conn: sqlite3.Connection, state: Fingerprinted) -> None:
    with msgstore.write_transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO main.meta (key, value) VALUES (?, ?)",
            (SAVED_STATE, state.to_json()),
        )


def state_saved(conn: sqlite3.Connection, direction: Direction = FORWARD) -> Fingerprinted | None:
    row = conn.execute("SELECT value FROM main.meta WHERE key = ?", (SAVED_STATE,)).fetchone()
    if row is None:
        return None
    try:
        return Fingerprinted.from_json(row[0], direction)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable: measure everything instead
