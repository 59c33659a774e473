"""Return to 2.8.0.0: the message store converted back keeps every message, the mail that
arrived since included, refuses a damaged one, and is safe to kill at any point."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.mail import (
    mailrecords,
    msgcounts,
    msgmigrate,
    msgstore,
    purge,
    quarantine,
    retention,
)
from appliance.mail.msgcounts import StoreCounts
from appliance.mail.msgmigrate import BACK
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout
from tests.appliance import test_msgmigrate as forward
from tests.appliance.test_msgmigrate import (
    NOW,
    ODD_RESPONSES,
    REPO,
    _behind_the_conversions_back,
    _journal_objects,
    _raws,
    _record,
    _smtp_lines,
    _store_logging,
    _writes_across,
)
from tests.support.message_store import store_rows

# The upgrade's fixtures: 64 ids a chunk (autouse), and a demo store of 600 messages.
small_chunks = forward.small_chunks
store = forward.store


def _upgraded() -> StoreCounts:
    """The store converted to 2.8.1 as the install does; its counts (the same as before)."""
    before = msgcounts.store_counts(cached=False)
    msgmigrate.migrate_prepare()
    assert msgmigrate.migrate_finish().counts == before
    assert msgstore.format_version() == "2.8.1"
    return before


def _go_back() -> msgmigrate.MigrateResult:
    msgmigrate.migrate_prepare(direction=BACK)
    return msgmigrate.migrate_finish(direction=BACK)


def _check_sqlite(db: Path) -> None:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def _dump() -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table of the store, and its schema: what "unchanged" means."""
    conn = sqlite3.connect(f"{layout().msgstore_db.as_uri()}?mode=ro", uri=True)
    try:
        names = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        dump = {name: conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall() for name in names}
        dump["(schema)"] = conn.execute(
            "SELECT type, name, sql FROM sqlite_schema ORDER BY name"
        ).fetchall()
        return dump
    finally:
        conn.close()


def test_a_round_trip_gives_back_every_row_and_every_byte(store: Path) -> None:
    now = int(NOW.timestamp())
    released = sorted(_raws())[3]
    quarantine.quarantine_release_claim([released], by="admin", now=now)
    quarantine.quarantine_release_finish([released], now=now)
    before = msgcounts.store_counts(cached=False)
    raws, lines = _raws(), _smtp_lines()
    _upgraded()

    prepared = msgmigrate.migrate_prepare(direction=BACK)
    assert prepared.in_sync and prepared.counts == before
    assert prepared.path.name == "msgstore-2.8.0.db.partial"
    result = msgmigrate.migrate_finish(direction=BACK)

    assert msgstore.format_version() == "2.8.0"
    assert result.format_version == "2.8.0" and result.counts == before
    assert msgcounts.store_counts(cached=False) == before  # every row re-read
    assert _raws() == raws  # byte for byte
    assert _smtp_lines() == lines
    assert quarantine.quarantined_copies([released])[released].release_state == "released"
    conn = msgstore.connect(readonly=True)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        (stored,) = conn.execute("SELECT value FROM meta WHERE key = 'reversion'").fetchone()
    finally:
        conn.close()
    _check_sqlite(layout().msgstore_db)
    assert "quarantined_message_raw" in tables and "message_body" not in tables
    assert "tracking_log_sender" in tables and not any(t.startswith("mm_") for t in tables)
    assert msgmigrate.MigrateResult.from_json(stored) == result
    assert not prepared.path.exists()
    # Run again, each step returns what is done; and the upgrade can be made again from here.
    assert msgmigrate.migrate_finish(direction=BACK) == result
    assert msgmigrate.migrate_prepare(direction=BACK).counts is None
    assert _upgraded() == before


def test_every_kind_of_status_line_comes_back_whole(appliance_root: Path) -> None:
    _store_logging(ODD_RESPONSES)
    msgmigrate.migrate_finish()
    msgmigrate.migrate_finish(direction=BACK)
    assert [line for _, line in _smtp_lines()] == ODD_RESPONSES


def test_the_mail_that_arrived_since_and_every_change_to_the_2_8_1_store_go_back(
    store: Path,
) -> None:
    """The go-back case: the new system ran (mail, deletions, releases, a purge), and goes on
    running between prepare and finish; all of it is in the 2.8.0 store afterwards."""
    _upgraded()
    now = int(NOW.timestamp())
    week = [mailrecords.mail_record(_record(n)) for n in range(2)]  # before the way back
    ids = sorted(_raws())
    msgmigrate.migrate_prepare(direction=BACK)
    # The journal is on the 2.8.1 store, made for its table names.
    assert "mm_changed_message_body_insert" in _journal_objects(layout().msgstore_db)

    late = [mailrecords.mail_record(_record(n)) for n in range(10, 13)]
    mailrecords.mail_record(_record(99, quarantine=False))
    deleted = quarantine.quarantine_delete([ids[1], week[0]]).deleted
    quarantine.quarantine_release_claim([ids[2], late[0]], by="admin", now=now)
    quarantine.quarantine_release_finish([ids[2]], now=now)
    _behind_the_conversions_back("UPDATE tracking_log SET subject = 'edited' WHERE id = 7")
    spam = next(s for s in retention.store_usage() if s.name == "Spam quarantine")
    retention.store_retention_set(spam.id, 5)
    purged = purge.purge_expired(now=NOW, pacing=purge.Pacing(idle_pause=0, busy_pause=0))
    assert purged.messages_deleted[spam.id] > 0 and len(deleted) == 2
    expected = msgcounts.store_counts(cached=False)
    raws, lines = _raws(), _smtp_lines()

    result = msgmigrate.migrate_finish(direction=BACK)
    assert result.counts == expected and not result.full_conversion and result.chunks_copied
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts(cached=False) == expected
    assert _raws() == raws and _smtp_lines() == lines
    assert all(msgstore.message_raw(i) == _record(n).raw for i, n in zip(late, range(10, 13)))
    assert msgstore.message_raw(week[1]) == _record(1).raw
    assert msgstore.message_raw(ids[1]) is None and msgstore.message_raw(week[0]) is None
    copies = quarantine.quarantined_copies([ids[2], late[0]])
    assert (copies[ids[2]].release_state, copies[late[0]].release_state) == (
        "released",
        "releasing",
    )
    kept = next(s for s in retention.store_usage() if s.id == spam.id)
    assert kept.retention_days == 5
    assert store_rows("SELECT subject FROM tracking_log WHERE id = 7") == [("edited",)]


def test_the_mail_writer_reopens_the_store_after_the_way_back(store: Path) -> None:
    _upgraded()
    _writes_across(store, _go_back)
    assert msgstore.format_version() == "2.8.0"


def _tamper(message_id: int, how: str) -> None:
    """One 2.8.1 body made wrong behind everyone's back, fingerprints unchanged."""
    sql = {
        "content": "UPDATE message_body SET body = ? WHERE message_id = ?",
        "size": "UPDATE message_body SET raw_size = raw_size + 1 WHERE message_id = ? AND ? = ?",
        "damaged": "UPDATE message_body SET body = ? WHERE message_id = ?",
    }[how]
    body = msgstore.compress_body(b"Subject: forged\r\n\r\nnot what was stored\r\n")
    params = {
        "content": (body, message_id),
        "size": (message_id, 1, 1),
        "damaged": (b"\x00not zlib", message_id),
    }[how]
    conn = sqlite3.connect(layout().msgstore_db)
    try:
        with conn:
            assert conn.execute(sql, params).rowcount == 1
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["content", "size", "damaged"])
@pytest.mark.parametrize("when", ["before prepare", "between prepare and finish"])
def test_a_tampered_2_8_1_body_stops_the_way_back_and_leaves_the_store(
    store: Path, how: str, when: str
) -> None:
    _upgraded()
    victim = sorted(_raws())[20]
    refused = rf"stored message {victim}\b"
    if when == "before prepare":
        _tamper(victim, how)
        as_it_was = _dump()
        with pytest.raises(MalformedApplianceFile, match=refused):
            msgmigrate.migrate_prepare(direction=BACK)
    else:
        untampered = _dump()
        msgmigrate.migrate_prepare(direction=BACK)
        _tamper(victim, how)
        with pytest.raises(MalformedApplianceFile, match=refused):
            msgmigrate.migrate_finish(direction=BACK)
        # The store as it was, but for the tampering itself.
        as_it_was = untampered | {"message_body": _dump()["message_body"]}
    with pytest.raises(MalformedApplianceFile, match=refused):
        msgmigrate.migrate_finish(direction=BACK)  # not on a second try either
    assert msgstore.format_version() == "2.8.1"
    msgmigrate.migrate_discard(direction=BACK)  # as an abort does: the journal goes
    assert _dump() == as_it_was
    assert not msgmigrate.partial_path(direction=BACK).exists()


def test_discarding_the_way_back_leaves_the_2_8_1_store_as_it_was(store: Path) -> None:
    _upgraded()
    as_it_was = _dump()
    msgmigrate.migrate_prepare(direction=BACK)
    assert msgmigrate.partial_path(direction=BACK).exists()
    msgmigrate.migrate_discard()  # the upgrade's own clean-up (phase 9) leaves the way back's
    assert _journal_objects(layout().msgstore_db)
    assert msgmigrate.partial_path(direction=BACK).exists()
    assert msgmigrate.migrate_discard(direction=BACK) > 0
    assert _dump() == as_it_was
    assert msgstore.format_version() == "2.8.1"
    assert not msgmigrate.partial_path(direction=BACK).exists()


# --- Kills -----------------------------------------------------------------------------------

_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from appliance.mail import msgcounts, msgmigrate
msgcounts.CHUNK_BITS = 6  # as the small_chunks fixture: checksums depend on it
root = Path({root!r})
step, point, number = {step!r}, {point!r}, {number!r}
seen = 0

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def progress(report):
    global seen
    if report.step == point:
        seen += 1
        if seen == number:
            die()

if point == "rename":  # after the old store's checkpoint and log removal, before the rename
    os.replace = die
if point == "renamed":  # after the rename, before the directory is synced
    msgmigrate.fsync_dir = die
if step == "prepare":
    msgmigrate.migrate_prepare(root, progress=progress, direction=msgmigrate.BACK)
else:
    msgmigrate.migrate_finish(root, progress=progress, direction=msgmigrate.BACK)
"""


def _killed(root: Path, step: str, point: str, number: int = 1) -> None:
    """Run one step of the way back in a process of its own, SIGKILLed at ``point``."""
    script = _KILL_SCRIPT.format(
        repo=str(REPO), root=str(root), step=step, point=point, number=number
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, f"{step} never reached {point} #{number}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "point", "number"),
    [
        ("prepare", "copy", 1),
        ("prepare", "copy", 17),
        ("prepare", "verify", 9),
        ("finish", "copy", 1),
        ("finish", "verify", 1),
        ("finish", "swap", 1),
        ("finish", "rename", 1),
        ("finish", "renamed", 1),
    ],
)
def test_a_kill_anywhere_on_the_way_back_leaves_one_whole_store_and_a_rerun_ends_it(
    store: Path, step: str, point: str, number: int
) -> None:
    _upgraded()
    if step == "finish":
        msgmigrate.migrate_prepare(direction=BACK)
    mailrecords.mail_record(_record(1))  # so finish has chunks to copy
    expected = msgcounts.store_counts(cached=False)
    raws = _raws()

    _killed(store, step, point, number)
    version = msgstore.format_version()
    assert version == ("2.8.0" if point == "renamed" else "2.8.1")
    _check_sqlite(layout().msgstore_db)
    assert msgcounts.store_counts(cached=False) == expected  # whole, in either format
    if version == "2.8.1":  # the new system serves on: the mail keeps coming
        mailrecords.mail_record(_record(2))
        expected = msgcounts.store_counts(cached=False)
        raws = _raws()

    assert _go_back().counts == expected
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts(cached=False) == expected
    assert _raws() == raws
    _check_sqlite(layout().msgstore_db)
    msgmigrate.migrate_discard(direction=BACK)
    assert not list(layout().msgstore_dir.glob("*.partial*"))
