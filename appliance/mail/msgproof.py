"""Proof that an upgrade kept every stored message: counts and content checksums per store.

The validation report after an install (upgrades.validation) compares the message store as it
was when mail stopped with the store after the commit. Phase 7 already compares the old store
with the new file, but with mail stopped and through digests cached since phase 2; the proof
here is taken afterwards, from the files themselves, so it also catches a message removed or
altered between the conversion and the report.

The checksum is over content, not over the storage format: each message's row in 2.8.0 terms
(:data:`appliance.mail.msgcounts.CHUNKED_TABLES`' canonical spelling, the same one the
conversion's chunk digests use) and the SHA-256 of its raw bytes (a 2.8.1 body is
decompressed and checked against its stored digest, as :mod:`appliance.mail.msgcounts` does).
So the same messages give the same checksum in either format.

Only messages up to a high-water mark (the highest id when mail stopped) are covered: once
mail flows again, new quarantined messages are not part of the comparison.

The proof reads the whole store, right after mail is accepted again: a million messages are
many seconds of CPU (a SHA-256 and a repr per message, a decompression per 2.8.1 body) in
competition with the mail service catching up. So it is paced as the conversion is
(:func:`appliance.mail.msgchunks.sync`): messages are read in blocks of :data:`BLOCK_ROWS`, each
its own short read (no read transaction held over the whole store, so the live store's WAL can
be checkpointed meanwhile), and after each block the proof rests ``yield_ratio`` times as long
as the block took. What it computes does not depend on the blocks: the same rows in the same
id order feed the same digests.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.mail import msgstore
from appliance.mail.msgcounts import CHUNKED_TABLES
from appliance.system.errors import ApplianceError, MalformedApplianceFile

_MESSAGES = next(big for big in CHUNKED_TABLES if big.name == "messages")
_BODIES = next(big for big in CHUNKED_TABLES if big.name == "bodies")
# The body of a message whose stored copy is missing or fails its own checksum.
DAMAGED = b"damaged"
# Messages per read: a few milliseconds of work, then a rest (see the module's docstring).
BLOCK_ROWS = 2000


@dataclass(frozen=True)
class StoreFacts:
    """The cheap facts taken the moment mail stopped (phase 3): counts per store and the mark."""

    upto_id: int  # the highest message id then; 0 for an empty store
    counts: dict[str, int]  # store name -> messages
    format_version: str

    @property
    def messages(self) -> int:
        return sum(self.counts.values())

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StoreProof:
    """Counts and content checksums per message store, for messages with id <= upto_id."""

    upto_id: int
    format_version: str
    counts: dict[str, int]
    checksums: dict[str, str]
    damaged: list[int] = field(default_factory=list)  # ids whose body is missing or fails

    @property
    def messages(self) -> int:
        return sum(self.counts.values())

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreProof:
        return cls(
            upto_id=int(data["upto_id"]),
            format_version=str(data["format_version"]),
            counts={str(k): int(v) for k, v in data["counts"].items()},
            checksums={str(k): str(v) for k, v in data["checksums"].items()},
            damaged=[int(i) for i in data.get("damaged", [])],
        )


@dataclass(frozen=True)
class StoreDifference:
    """One store whose messages differ between two proofs."""

    store: str
    messages_before: int | None
    messages_after: int | None
    checksum_equal: bool


def _open_file(path: Path) -> sqlite3.Connection:
    """A store file opened as unchangeable: no lock, no -wal or -shm created next to it, and
    nothing written (phase 4's kept copy must stay the very file it recorded)."""
    conn = sqlite3.connect(f"{Path(path).as_uri()}?mode=ro&immutable=1", uri=True)
    conn.row_factory = None
    return conn


def _open_live(root: Path | None) -> sqlite3.Connection:
    conn = msgstore.connect(root, readonly=True)
    conn.row_factory = None
    return conn


def _store_names(conn: sqlite3.Connection) -> dict[int, str]:
    return {int(i): str(name) for i, name in conn.execute("SELECT id, name FROM message_store")}


def facts_in(conn: sqlite3.Connection) -> StoreFacts:
    """The mark and the counts per store: one aggregate over the message table."""
    version = msgstore.connection_format(conn)
    names = _store_names(conn)
    (upto,) = conn.execute("SELECT coalesce(max(id), 0) FROM quarantined_message").fetchone()
    counts = {name: 0 for name in names.values()}
    for store_id, count in conn.execute(
        "SELECT store_id, count(*) FROM quarantined_message GROUP BY store_id"
    ):
        counts[names.get(int(store_id), f"#{store_id}")] = int(count)
    return StoreFacts(upto_id=int(upto), counts=counts, format_version=version)


def store_facts(root: Path | None = None) -> StoreFacts:
    """:func:`facts_in` on the live store (cheap enough for the downtime)."""
    conn = _open_live(root)
    try:
        return facts_in(conn)
    finally:
        conn.close()


def _body_digest(version: str, row: tuple[Any, ...]) -> bytes | None:
    """SHA-256 of the raw message, whichever format holds it; None when damaged or missing."""
    if version == msgstore.FORMAT_VERSION:
        (raw,) = row
        return None if raw is None else hashlib.sha256(raw).digest()
    codec, raw_size, stored_sha, body = row
    if body is None:
        return None
    try:
        raw = msgstore.decode_body(codec, body)
    except (ApplianceError, ValueError):
        return None
    actual = hashlib.sha256(raw).digest()
    if actual != bytes(stored_sha) or len(raw) != raw_size:
        return None
    return actual


def proof_in(
    conn: sqlite3.Connection,
    upto_id: int,
    *,
    yield_ratio: float = 0.0,
    block: int = BLOCK_ROWS,
    rest: Callable[[float], None] = time.sleep,
) -> StoreProof:
    """Counts and checksums per store of the messages with id <= ``upto_id``.

    One pass in id order over the messages joined with their bodies, ``block`` messages per
    read; per store, a SHA-256 over each message's canonical row and its body's digest (a
    missing or damaged body counts as :data:`DAMAGED`, so the checksum differs from the
    original's). After each block, ``rest`` (time.sleep) for ``yield_ratio`` times the block's
    time, so the mail service keeps its share of the machine.
    """
    version = msgstore.connection_format(conn)
    names = _store_names(conn)
    columns = ", ".join(f"m.{c.strip()}" for c in _MESSAGES.canonical[version].split(","))
    body_table = _BODIES.table[version]
    body_columns = ", ".join(
        f"b.{c.strip()}" for c in _BODIES.canonical[version].split(",")[1:]
    )  # all but the key
    width = len(_MESSAGES.canonical[version].split(","))
    query = (
        f"SELECT {columns}, {body_columns} FROM quarantined_message AS m"  # noqa: S608 - constants
        f" LEFT JOIN {body_table} AS b ON b.message_id = m.id"
        " WHERE m.id > ? AND m.id <= ? ORDER BY m.id LIMIT ?"
    )
    digests: dict[str, Any] = {name: hashlib.sha256() for name in names.values()}
    counts = {name: 0 for name in names.values()}
    damaged: list[int] = []
    after = 0  # the last id read: each block starts past it (the id is the first column)
    while True:
        began = time.monotonic()
        rows = conn.execute(query, (after, upto_id, block)).fetchall()
        for row in rows:
            message = tuple(row[:width])
            store = names.get(int(message[1]), f"#{message[1]}")
            body = _body_digest(version, tuple(row[width:]))
            if body is None:
                damaged.append(int(message[0]))
                body = DAMAGED
            digests.setdefault(store, hashlib.sha256()).update(repr((message, body)).encode())
            counts[store] = counts.get(store, 0) + 1
        if len(rows) < block:
            break
        after = int(rows[-1][0])
        if (pause := (time.monotonic() - began) * yield_ratio) > 0:
            rest(pause)
    return StoreProof(
        upto_id=upto_id,
        format_version=version,
        counts=counts,
        checksums={name: digest.hexdigest() for name, digest in digests.items()},
        damaged=damaged,
    )


def store_proof(upto_id: int, root: Path | None = None, *, yield_ratio: float = 0.0) -> StoreProof:
    """:func:`proof_in` on the live store (after the commit, mail flowing)."""
    conn = _open_live(root)
    try:
        return proof_in(conn, upto_id, yield_ratio=yield_ratio)
    finally:
        conn.close()


def file_proof(path: Path, upto_id: int | None = None, *, yield_ratio: float = 0.0) -> StoreProof:
    """:func:`proof_in` on a store file kept aside (phase 4's), without writing anything; all
    of its messages unless ``upto_id`` is given."""
    if not Path(path).is_file():
        raise MalformedApplianceFile(f"the kept message store {path} is gone")
    conn = _open_file(path)
    try:
        if upto_id is None:
            upto_id = facts_in(conn).upto_id
        return proof_in(conn, upto_id, yield_ratio=yield_ratio)
    except sqlite3.DatabaseError as exc:
        raise MalformedApplianceFile(
            f"the kept message store {path} cannot be read: {exc}"
        ) from exc
    finally:
        conn.close()


def proof_differences(before: StoreProof, after: StoreProof) -> list[StoreDifference]:
    """Every store whose count or checksum differs (a store with no messages on either side
    and absent on the other is no difference: 2.8.0 and 2.8.1 list the same stores)."""
    differences = []
    for store in sorted(before.counts.keys() | after.counts.keys()):
        count_before, count_after = before.counts.get(store), after.counts.get(store)
        if not count_before and not count_after:
            continue
        same = before.checksums.get(store) == after.checksums.get(store)
        if count_before != count_after or not same:
            differences.append(StoreDifference(store, count_before, count_after, same))
    return differences
