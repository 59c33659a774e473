"""The 2.8.1 message store conversion keeps every message and is safe to kill at any point."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.config.smtp import SmtpSettings
from appliance.config.store import write_smtp_settings
from appliance.mail import (
    demo_store,
    mailrecords,
    msgbackup,
    msgcounts,
    msgjournal,
    msgmigrate,
    msgstore,
    processing,
    purge,
    quarantine,
    retention,
    tracking,
)
from appliance.mail.mailrecords import MailRecord
from appliance.mail.msgcounts import StoreCounts
from appliance.mail.msgmigrate import MigrateProgress, MigrationStopped
from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.paths import layout
from tests.support.message_store import store_rows

NOW = datetime(2013, 10, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 ids a chunk, so a few hundred messages make many chunks (and many transactions)."""
    monkeypatch.setattr(msgcounts, "CHUNK_BITS", 6)


@pytest.fixture
def store(appliance_root: Path) -> Path:
    demo_store.fill_demo(messages=600, now=NOW)
    processing.fill_demo_minutes(days=1, now=NOW)
    (layout().cpe_dir).mkdir(parents=True, exist_ok=True)
    write_smtp_settings(SmtpSettings())  # the log retentions a purge reads
    return appliance_root


def _raws(root: Path | None = None) -> dict[int, bytes]:
    conn = msgstore.connect(root, readonly=True)
    try:
        ids = [row[0] for row in conn.execute("SELECT id FROM quarantined_message ORDER BY id")]
    finally:
        conn.close()
    return {message_id: msgstore.message_raw(message_id, root) for message_id in ids}


def _smtp_lines(root: Path | None = None) -> list[tuple[int, str]]:
    conn = msgstore.connect(root, readonly=True)
    try:
        if msgstore.connection_format(conn) == msgstore.FORMAT_2_8_1:
            rows = conn.execute("SELECT id, status, response FROM smtp_log ORDER BY id")
            return [(i, msgstore.join_status(status, text)) for i, status, text in rows]
        return [tuple(row) for row in conn.execute("SELECT id, response FROM smtp_log ORDER BY id")]
    finally:
        conn.close()


# SMTP responses of every odd kind: with and without text, empty, not a status, a mistyped one.
ODD_RESPONSES = ["250 2.0.0 Ok", "250 ", "250", "", "hello", "999 odd", "25O x", "421-x", "5555 x"]


def _store_logging(responses: list[str]) -> None:
    """A new 2.8.0 store whose SMTP log holds ``responses``, one row each, in that order."""
    msgstore.create()
    conn = msgstore.connect()
    with conn:
        conn.executemany(
            "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
            " VALUES (0, '', '', '', ?)",
            [(response,) for response in responses],
        )
    conn.close()


def _record(n: int, *, quarantine: bool = True) -> MailRecord:
    raw = f"From: late{n}@example.net\r\nSubject: late {n}\r\n\r\nbody {n}\r\n".encode()
    return MailRecord(
        logged_at=int(NOW.timestamp()) - 60,
        client_ip="203.0.113.9",
        sender=f"late{n}@example.net",
        recipients=("anna.schmidt@example.com",),
        message_id=f"<late{n}@example.net>",
        subject=f"late {n}",
        size=len(raw),
        verdict="spam" if quarantine else "clean",
        action="quarantined" if quarantine else "delivered",
        response="250 2.0.0 Ok: queued as LATE" if quarantine else "451 4.3.0 try later",
        store_name="Spam quarantine" if quarantine else None,
        raw=raw if quarantine else None,
    )


def test_a_demo_store_converts_with_every_body_and_row_preserved(store: Path) -> None:
    before = msgcounts.store_counts(cached=False)
    raws, lines = _raws(), _smtp_lines()
    prepared = msgmigrate.migrate_prepare()
    assert prepared.in_sync and prepared.counts == before
    result = msgmigrate.migrate_finish()

    assert msgstore.format_version() == "2.8.1"
    assert result.counts == before and result.counts.messages == 600
    assert msgcounts.store_counts(cached=False) == before  # every row re-read
    assert _raws() == raws
    assert _smtp_lines() == lines
    conn = msgstore.connect(readonly=True)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 20801
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        statuses = {row[0] for row in conn.execute("SELECT DISTINCT status FROM smtp_log")}
    finally:
        conn.close()
    assert "message_body" in tables and "quarantined_message_raw" not in tables
    assert "tracking_log_sender" in tables  # the indexes came along
    assert statuses == {250, 554}
    assert not msgmigrate.partial_path().exists()


def test_finish_without_prepare_converts_everything(store: Path) -> None:
    before = msgcounts.store_counts(cached=False)
    result = msgmigrate.migrate_finish()
    assert result.full_conversion
    assert msgcounts.store_counts(cached=False) == before


def test_mail_and_purges_between_prepare_and_finish_are_carried_over(store: Path) -> None:
    msgmigrate.migrate_prepare()
    # While mail still flows: new mail, a lowered retention and the purge it triggers.
    late_ids = [mailrecords.mail_record(_record(n)) for n in range(3)]
    mailrecords.mail_record(_record(99, quarantine=False))
    spam = next(s for s in retention.store_usage() if s.name == "Spam quarantine")
    retention.store_retention_set(spam.id, 5)
    purged = purge.purge_expired(now=NOW, pacing=purge.Pacing(idle_pause=0, busy_pause=0))
    assert purged.messages_deleted[spam.id] > 0
    before = msgcounts.store_counts(cached=False)
    raws = _raws()

    result = msgmigrate.migrate_finish()
    assert result.counts == before and not result.full_conversion
    assert msgcounts.store_counts(cached=False) == before
    assert _raws() == raws
    assert all(msgstore.message_raw(i) is not None for i in late_ids)
    kept = next(s for s in retention.store_usage() if s.id == spam.id)
    # spam was counted after the late mail arrived and before the purge.
    expected = spam.message_count - purged.messages_deleted[spam.id]
    assert (kept.retention_days, kept.message_count) == (5, expected)


def test_running_finish_twice_returns_the_same_result_and_changes_nothing(store: Path) -> None:
    msgmigrate.migrate_prepare()
    first = msgmigrate.migrate_finish()
    inode = layout().msgstore_db.stat().st_ino
    assert msgmigrate.migrate_finish() == first
    assert msgmigrate.migrate_prepare().counts is None  # nothing left to prepare
    assert layout().msgstore_db.stat().st_ino == inode


@pytest.mark.parametrize("step", ["copy", "verify", "swap"])
def test_a_failure_inside_finish_leaves_the_2_8_0_store_and_a_rerun_succeeds(
    store: Path, step: str
) -> None:
    msgmigrate.migrate_prepare()
    mailrecords.mail_record(_record(1))  # so finish has a chunk to copy
    before = msgcounts.store_counts(cached=False)

    def crash(progress: MigrateProgress) -> None:
        if progress.step == step:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        msgmigrate.migrate_finish(progress=crash)
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts(cached=False) == before
    assert msgmigrate.migrate_finish().counts == before


def _journal_objects(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [n for (n,) in conn.execute("SELECT name FROM sqlite_schema WHERE name LIKE 'mm_%'")]
    finally:
        conn.close()


def test_phase_7_looks_again_only_at_the_chunks_the_old_store_journaled(store: Path) -> None:
    """The downtime reads what changed since phase 2, not the store: the journal names the
    chunks, and one that nothing touched is not even fingerprinted again."""
    msgmigrate.migrate_prepare()
    late = mailrecords.mail_record(_record(1))
    assert late is not None
    conn, created = msgmigrate._open_partial(None)
    try:
        saved = msgjournal.state_saved(conn)
        changed = msgjournal.journal_chunks(conn)
        assert not created and saved is not None and changed is not None
        chunk = late >> msgcounts.CHUNK_BITS
        assert changed["messages"] == {chunk} and changed["bodies"] == {chunk}
        todo = saved.journaled(conn, changed)
    finally:
        conn.close()
    assert {(big.name, c) for big, c in todo} == {
        (name, c) for name, chunks in changed.items() for c in chunks
    }


def test_the_verification_reports_its_progress_out_of_every_chunk_of_both_sides(
    store: Path,
) -> None:
    """Phase 2's longest step shows how far it is (it said 0% until it ended): every chunk of
    the store and of the file built is counted, the ones taken from the cache too, in prepare
    and again in finish."""
    seen: list[MigrateProgress] = []
    msgmigrate.migrate_prepare(progress=seen.append)
    msgmigrate.migrate_finish(progress=seen.append)
    runs: list[list[MigrateProgress]] = []
    for step in (step for step in seen if step.step == "verify"):
        if step.done == 1:
            runs.append([])
        runs[-1].append(step)
    assert len(runs) == 2  # prepare's, finish's
    for run in runs:
        total = run[0].total
        assert total > 0 and all(step.total == total for step in run)
        assert [step.done for step in run] == list(range(1, total + 1))


def test_mail_during_prepares_verification_is_caught_up_before_phase_7(store: Path) -> None:
    """The verification reads the whole store while mail flows; what came in meanwhile is
    copied by prepare's catch-up rounds, so phase 7 finds an empty journal."""
    late: list[int | None] = []

    def progress(step: MigrateProgress) -> None:
        if step.step == "verify" and not late:
            late.append(mailrecords.mail_record(_record(3)))

    msgmigrate.migrate_prepare(progress=progress)
    assert late and late[0] is not None
    conn, _ = msgmigrate._open_partial(None)
    try:
        changed = msgjournal.journal_chunks(conn)
    finally:
        conn.close()
    assert changed is not None and not any(changed.values())
    before = msgcounts.store_counts(cached=False)
    result = msgmigrate.migrate_finish()
    assert result.counts == before and result.chunks_copied == 0
    assert msgstore.message_raw(late[0]) is not None


def _behind_the_conversions_back(sql: str) -> None:
    """One statement on the old store from a connection of its own, as another process would."""
    conn = sqlite3.connect(layout().msgstore_db)
    try:
        with conn:
            conn.execute(sql)
    finally:
        conn.close()


def test_an_update_that_fingerprints_miss_is_carried_over(store: Path) -> None:
    """A subject changed after phase 2 keeps the chunk's row count and sums: the journal still
    names the chunk, so phase 7 copies and digests it again."""
    msgmigrate.migrate_prepare()
    _behind_the_conversions_back("UPDATE quarantined_message SET subject = 'edited' WHERE id = 5")
    before = msgcounts.store_counts(cached=False)
    assert msgmigrate.migrate_finish().counts == before
    assert msgcounts.store_counts(cached=False) == before
    assert store_rows("SELECT subject FROM quarantined_message WHERE id = 5") == [("edited",)]
    assert _journal_objects(layout().msgstore_db) == []  # the new file has no journal


def test_without_a_whole_journal_phase_7_measures_everything(store: Path) -> None:
    """A trigger gone (here dropped behind the conversion's back, with mail stored after):
    nothing is trusted, every chunk is fingerprinted, and the late mail is still carried."""
    msgmigrate.migrate_prepare()
    _behind_the_conversions_back("DROP TRIGGER mm_changed_quarantined_message_insert")
    mailrecords.mail_record(_record(2))
    before = msgcounts.store_counts(cached=False)
    assert msgmigrate.migrate_finish().counts == before
    assert msgcounts.store_counts(cached=False) == before


def test_discard_takes_the_journal_out_of_a_store_that_stays_2_8_0(store: Path) -> None:
    msgmigrate.migrate_prepare()
    assert "mm_changed" in _journal_objects(layout().msgstore_db)
    msgmigrate.migrate_discard()
    assert _journal_objects(layout().msgstore_db) == []
    assert msgstore.format_version() == "2.8.0"


def test_should_stop_stops_prepare_and_discard_frees_its_files(store: Path) -> None:
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(MigrationStopped):
        msgmigrate.migrate_prepare(should_stop=stop)
    assert msgmigrate.partial_path().exists()
    assert msgmigrate.migrate_discard() > 0
    assert not msgmigrate.partial_path().exists()
    assert msgmigrate.migrate_discard() == 0
    assert msgstore.format_version() == "2.8.0"
    assert msgmigrate.migrate_prepare().in_sync  # starts over cleanly


def test_a_damaged_partial_file_is_rebuilt(store: Path) -> None:
    before = msgcounts.store_counts(cached=False)
    msgmigrate.partial_path().write_bytes(b"not a database at all" * 100)
    assert msgmigrate.migrate_prepare().in_sync
    assert msgmigrate.migrate_finish().counts == before


def test_a_tampered_partial_file_is_caught_and_recopied(store: Path) -> None:
    before = msgcounts.store_counts(cached=False)
    raws = _raws()
    msgmigrate.migrate_prepare()
    conn = sqlite3.connect(msgmigrate.partial_path())
    with conn:  # same fingerprint (ids, times, sizes), different content
        conn.execute("UPDATE tracking_log SET subject = 'tampered' WHERE id = 42")
        conn.execute("UPDATE message_body SET body = ? WHERE message_id = 7", (b"\x00" * 10,))
    conn.close()
    # Without the digest cache (as after a reboot that lost it) every chunk is re-read: the
    # damaged body fails its SHA-256, the subject its digest, and both chunks are copied again.
    (layout().msgstore_dir / "msgstore-checksums.db").unlink()
    assert msgmigrate.migrate_finish().counts == before
    assert msgcounts.store_counts(cached=False) == before
    assert _raws() == raws


def test_an_unknown_store_format_is_refused_and_left_alone(store: Path) -> None:
    conn = msgstore.connect()
    with conn:
        conn.execute("UPDATE meta SET value = '9.9.9' WHERE key = 'format_version'")
    conn.close()
    data = layout().msgstore_db.read_bytes()
    with pytest.raises(ApplianceError):
        msgmigrate.migrate_finish()
    assert layout().msgstore_db.read_bytes() == data


def test_backup_and_restore_put_the_2_8_0_store_back_exactly(store: Path, tmp_path: Path) -> None:
    before = msgcounts.store_counts(cached=False)
    backup = msgbackup.msgstore_backup(tmp_path / "backup" / "msgstore.db")
    # The store itself under a second name: no byte copy, whatever its size.
    assert backup.linked and backup.format_version == "2.8.0"
    assert backup.identity == msgbackup.file_identity(layout().msgstore_db)
    assert msgbackup.read_backup(backup.path) == backup
    again = msgbackup.msgstore_backup(backup.path)  # idempotent
    assert again.identity == backup.identity
    msgmigrate.migrate_finish()
    mailrecords.mail_record(_record(5))  # the new system ran a little

    msgbackup.msgstore_restore(backup.path)
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts(cached=False) == before
    # And the upgrade can be run again from there.
    assert msgmigrate.migrate_finish().counts == before


def test_the_rollback_renames_the_copy_into_place_and_a_second_pass_does_nothing(
    store: Path, tmp_path: Path
) -> None:
    """No new space on a disk that may be full: the checked copy becomes the store by rename;
    a pass run again after that rename (its process died before recording it) changes nothing."""
    before = msgcounts.store_counts(cached=False)
    backup = msgbackup.msgstore_backup(layout().msgstore_dir.parent / "phase4" / "msgstore.db")
    copy_inode = backup.path.stat().st_ino
    msgmigrate.migrate_finish()

    msgbackup.msgstore_restore(backup.path)
    assert layout().msgstore_db.stat().st_ino == copy_inode and not backup.path.exists()
    msgbackup.msgstore_restore(backup.path)  # the manifest is still there; the copy is not

    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts(cached=False) == before
    assert not list(layout().msgstore_dir.glob(".msgstore-restore-*"))


def test_without_a_hard_link_phase_4_makes_a_checked_byte_copy(store: Path, tmp_path: Path) -> None:
    """The work folder on another filesystem (here: one refusing links): a copy with its
    SHA-256 and counts, checked again before the rollback uses it."""
    device = layout().msgstore_db.stat().st_dev
    elsewhere = [
        Path(d) for d in ("/dev/shm", "/var/tmp", "/tmp") if Path(d).stat().st_dev != device
    ]
    if not elsewhere:
        pytest.skip("no second filesystem to copy to")
    before = msgcounts.store_counts(cached=False)
    with tempfile.TemporaryDirectory(dir=elsewhere[0]) as other:
        backup = msgbackup.msgstore_backup(Path(other) / "msgstore.db")
        assert not backup.linked and backup.counts == before and len(backup.sha256) == 64
        msgmigrate.migrate_finish()
        msgbackup.msgstore_restore(backup.path)
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts(cached=False) == before


def test_a_kept_store_written_after_phase_4_is_refused(store: Path, tmp_path: Path) -> None:
    """The kept link must be the file as phase 4 left it: a write since (here a message stored
    behind the install's back, before the switch) makes the rollback refuse it, not guess."""
    backup = msgbackup.msgstore_backup(tmp_path / "msgstore.db")
    time.sleep(0.01)  # past the file system's timestamp granularity
    mailrecords.mail_record(_record(9))
    msgmigrate.checkpoint(layout().msgstore_db)
    with pytest.raises(MalformedApplianceFile, match="does not match its manifest"):
        msgbackup.msgstore_restore(backup.path)


def test_a_tampered_backup_is_refused_and_the_store_unchanged(store: Path, tmp_path: Path) -> None:
    backup = msgbackup.msgstore_backup(tmp_path / "msgstore.db")
    msgmigrate.migrate_finish()
    after = msgcounts.store_counts(cached=False)
    data = bytearray(backup.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    backup.path.write_bytes(bytes(data))
    with pytest.raises(MalformedApplianceFile):
        msgbackup.msgstore_restore(backup.path)
    assert msgstore.format_version() == "2.8.1"
    assert msgcounts.store_counts(cached=False) == after
    assert not list(layout().msgstore_dir.glob(".msgstore-restore-*"))
    with pytest.raises(MalformedApplianceFile):
        msgbackup.msgstore_restore(tmp_path / "no-such-backup.db")


def test_the_console_readers_and_the_mail_writer_work_on_2_8_1(store: Path) -> None:
    stores_before = msgstore.list_stores()
    usage_before = retention.store_usage()
    page_before = tracking.tracking_page(tracking.TrackingFilter())
    series_before = processing.series(
        int((NOW - timedelta(days=1)).timestamp()), int(NOW.timestamp()), 3600
    )
    msgmigrate.migrate_finish()

    assert msgstore.list_stores() == stores_before
    assert retention.store_usage() == usage_before
    assert tracking.tracking_page(tracking.TrackingFilter()) == page_before
    assert (
        processing.series(int((NOW - timedelta(days=1)).timestamp()), int(NOW.timestamp()), 3600)
        == series_before
    )
    totals = msgstore.totals()
    assert totals is not None and totals.messages == 600
    assert retention.age_distribution(now=NOW).stores

    new_id = mailrecords.mail_record(_record(7))
    assert new_id is not None
    assert msgstore.message_raw(new_id) == _record(7).raw
    assert _smtp_lines()[-1][1] == "250 2.0.0 Ok: queued as LATE"
    result = purge.purge_expired(
        now=NOW + timedelta(days=400), pacing=purge.Pacing(idle_pause=0, busy_pause=0)
    )
    assert sum(result.messages_deleted.values()) == 601
    # The bodies went with their messages (ON DELETE CASCADE).
    assert store_rows("SELECT count(*) FROM message_body") == [(0,)]


def test_a_store_can_be_created_and_filled_in_2_8_1(appliance_root: Path) -> None:
    msgstore.create(format_version="2.8.1")
    msgstore.create(format_version="2.8.1")  # idempotent
    with pytest.raises(ApplianceError):
        msgstore.create()  # not grafted onto 2.8.0
    demo_store.fill_demo(messages=50, now=NOW)
    assert msgstore.format_version() == "2.8.1"
    counts = msgcounts.store_counts(cached=False)
    assert (counts.messages, counts.bodies, counts.smtp_log) == (50, 50, 50)


@pytest.mark.parametrize(
    "line",
    ["250 2.0.0 Ok", "554 5.7.1 Rejected", "250 ", "250", "", "hello", "999 odd", "25O x", "421-x"],
)
def test_the_status_split_is_lossless(line: str) -> None:
    status, rest = msgstore.split_status(line)
    assert msgstore.join_status(status, rest) == line


def test_the_status_split_in_sql_matches_python(appliance_root: Path) -> None:
    _store_logging(ODD_RESPONSES)
    before = msgcounts.store_counts(cached=False)
    msgmigrate.migrate_finish()
    assert msgcounts.store_counts(cached=False) == before
    rows = store_rows("SELECT status, response FROM smtp_log ORDER BY id")
    assert rows == [msgstore.split_status(line) for line in ODD_RESPONSES]


def test_store_counts_is_the_same_cached_and_uncached(store: Path) -> None:
    full = msgcounts.store_counts(cached=False)
    assert msgcounts.store_counts() == full
    assert msgcounts.store_counts() == full  # from the cache now
    assert isinstance(StoreCounts.from_json(full.__dict__), StoreCounts)


def _writes_across(store: Path, swap: Callable[[], object]) -> None:
    """The mail service's store writer stores a message, ``swap`` puts another store file in
    place under it, and it stores one more: it must have reopened the new file, where both
    messages are then read back whole."""
    from smtp.server import StoreWriter

    writer = StoreWriter(store)
    writer.start()
    try:
        first = writer.submit(_record(1)).result(timeout=30)
        swap()
        second = writer.submit(_record(2)).result(timeout=30)
    finally:
        writer.close()
    assert msgstore.message_raw(first) == _record(1).raw
    assert msgstore.message_raw(second) == _record(2).raw


def test_the_mail_writer_reopens_the_store_after_the_swap(store: Path) -> None:
    _writes_across(store, msgmigrate.migrate_finish)
    assert msgstore.format_version() == "2.8.1"


_KILL_SCRIPT = """
import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
sys.path.insert(0, {repo!r})
import django
django.setup()
from pathlib import Path
from appliance.mail import msgcounts, msgmigrate
msgcounts.CHUNK_BITS = 6  # as the small_chunks fixture: checksums depend on it
root = Path({root!r})
def said(progress):
    print(progress.step, progress.done, flush=True)
msgmigrate.migrate_prepare(root, progress=said)
msgmigrate.migrate_finish(root, progress=said)
print("done 0", flush=True)
"""


@pytest.mark.slow
def test_killing_the_conversion_anywhere_leaves_the_old_or_the_new_store(
    appliance_root: Path,
) -> None:
    """SIGKILL the conversion (prepare, then finish) as soon as it reports a step drawn at
    random: in copying, in verifying, at the swap. The kill lands while it works on what
    follows, never at a time guessed from the clock; each new process resumes the partial file,
    the last one runs to the end."""
    demo_store.fill_demo(messages=1500, now=NOW)
    before = msgcounts.store_counts(cached=False)
    script = _KILL_SCRIPT.format(repo=str(REPO), root=str(appliance_root))
    rng = random.Random(6)
    order = {"copy": 0, "verify": 1, "swap": 2, "done": 3}
    targets = [("copy", rng.randint(1, 30)), ("copy", rng.randint(1, 30))]
    targets += [("verify", rng.randint(1, 30)), ("swap", 0), ("done", 0)]
    outcomes = []
    for step, count in targets:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            name, done = line.split()
            if (order[name], int(done)) >= (order[step], count):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        version = msgstore.format_version()
        outcomes.append(version)
        assert msgcounts.store_counts(cached=False) == before, (step, version)
    assert outcomes[:3] == ["2.8.0"] * 3 and outcomes[-1] == "2.8.1", outcomes
    msgmigrate.migrate_prepare()
    assert msgmigrate.migrate_finish().counts == before
    assert msgcounts.store_counts(cached=False) == before
    assert store_rows("PRAGMA integrity_check") == [("ok",)]
    assert os.path.getsize(layout().msgstore_db) > 0


def test_release_records_are_carried_over_so_a_released_message_stays_released(
    store: Path,
) -> None:
    """Released before the upgrade (and one claimed between prepare and finish): both records
    are in the converted store, so neither message can be released, and delivered, again."""
    first, second = sorted(_raws())[:2]
    now = int(NOW.timestamp())
    quarantine.quarantine_release_claim([first], by="admin", now=now)
    quarantine.quarantine_release_finish([first], now=now)
    msgmigrate.migrate_prepare()
    quarantine.quarantine_release_claim([second], by="admin", now=now)
    msgmigrate.migrate_finish()

    outcome = quarantine.quarantine_release_claim([first, second], by="admin", now=now)
    assert outcome.claimed == () and set(outcome.released_already) == {first, second}


def test_phase_2s_checkpoint_empties_a_log_that_a_long_read_let_grow(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read held open while mail is written keeps every page in the log; phase 2's checkpoint
    copies them and empties the file, and the log file never keeps more than the limit once
    the writers start it over (phase 4 would otherwise pay to free it in the downtime)."""
    monkeypatch.setattr(msgmigrate, "TRUNCATE_WAIT_MS", 50)
    db = layout().msgstore_db
    reader = msgstore.connect(readonly=True)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM quarantined_message").fetchone()
    for n in range(40):
        mailrecords.mail_record(_record(n))
    assert msgstore.wal_bytes(db) > 0
    assert not msgmigrate.checkpoint_passive()  # the reader is still there: not emptied
    reader.execute("COMMIT")
    reader.close()
    assert msgmigrate.checkpoint_passive()
    assert msgstore.wal_bytes(db) == 0
    conn = msgstore.connect()
    try:
        limit = conn.execute("PRAGMA journal_size_limit").fetchone()[0]
    finally:
        conn.close()
    assert limit == msgstore.WAL_SIZE_LIMIT
