"""The retention purge deletes exactly what expired, in batches, and the disk gets it back."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from appliance.mail import purge, retention
from appliance.mail.purge import Pacing, PurgeProgress
from appliance.system import paths

from .conftest import NOW, MailData

# Tiny batches and steps, no pauses: many transactions even on a small store.
TINY = Pacing(
    first_rows=7, min_rows=7, max_rows=7, first_pages=5, min_pages=5, max_pages=5,
    busy_pause=0.0, idle_pause=0.0,
)  # fmt: skip


def _db(root) -> sqlite3.Connection:
    return sqlite3.connect(paths.layout(root).msgstore_db)


def test_it_deletes_exactly_the_expired_rows_of_each_store_and_log(store_root, mail: MailData):
    retention.log_retention_set(smtp_log_days=10, tracking_log_days=20, root=store_root)
    # Spam quarantine keeps 30 days, Virus 90, Policy violations 60, Archive 14 (the demo's).
    expired, kept = set(), set()
    for store, days in (("Spam quarantine", 30), ("Virus quarantine", 90),
                        ("Policy violations", 60), ("Archive", 14)):  # fmt: skip
        for age in (0.5, days - 0.01, days + 0.01, days + 40):
            (expired if age > days else kept).add(mail.message(store, age))
    smtp_kept = {mail.smtp(age) for age in (0, 9.9)}
    smtp_expired = {mail.smtp(age) for age in (10.1, 300)}
    tracking_kept = {mail.tracking(age) for age in (1, 19.9)}
    tracking_expired = {mail.tracking(age) for age in (20.1, 95)}
    mail.commit()

    result = purge.purge_expired(store_root, now=NOW, pacing=TINY)

    assert mail.ids("quarantined_message") == kept
    assert mail.ids("quarantined_message_raw") == kept  # the raw message went with its row
    assert mail.ids("smtp_log") == smtp_kept
    assert mail.ids("tracking_log") == tracking_kept
    assert sum(result.messages_deleted.values()) == len(expired) == 8
    assert result.messages_deleted == {mail.store(name): 2 for name in (
        "Spam quarantine", "Virus quarantine", "Policy violations", "Archive")}  # fmt: skip
    assert result.smtp_log_deleted == len(smtp_expired)
    assert result.tracking_log_deleted == len(tracking_expired)
    assert result.rows_deleted == 12


def test_many_small_batches_delete_everything_expired_and_nothing_else(store_root, mail: MailData):
    kept = {mail.message("Archive", 1) for _ in range(30)}
    for _ in range(100):
        mail.message("Archive", 20)
    mail.commit()
    batches: list[int] = []

    def progress(state: PurgeProgress) -> None:
        batches.append(state.messages_deleted.get(mail.store("Archive"), 0))

    result = purge.purge_expired(store_root, now=NOW, pacing=TINY, progress=progress)

    assert mail.ids("quarantined_message") == kept
    assert result.messages_deleted[mail.store("Archive")] == 100
    # 100 rows, 7 per transaction: 15 batches, reported one by one.
    assert sorted(set(batches)) == sorted({min(100, 7 * n) for n in range(0, 16)})


def test_the_file_shrinks_and_the_disk_gets_the_space_back(store_root, mail: MailData):
    for _ in range(12_000):
        mail.message("Spam quarantine", 45, size=6000)  # ~75 MB, all past 30 days
    keep = mail.message("Spam quarantine", 1, size=6000)
    mail.commit()
    db = paths.layout(store_root).msgstore_db
    before = db.stat().st_size
    assert before > 70 * 2**20

    result = purge.purge_expired(store_root, now=NOW)

    after = db.stat().st_size
    assert after < before - 65 * 2**20
    assert not os.path.exists(str(db) + "-wal") or os.path.getsize(str(db) + "-wal") == 0
    assert result.bytes_reclaimed == result.store_bytes_before - result.store_bytes_after
    assert result.bytes_reclaimed > 65 * 2**20
    # statvfs of the real disk: other processes write too, so allow for them generously.
    assert result.disk_free_after - result.disk_free_before > result.bytes_reclaimed // 2
    with _db(store_root) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert mail.ids("quarantined_message") == {keep}


def test_pages_left_free_by_an_interrupted_purge_are_returned_first(store_root, mail: MailData):
    for _ in range(2000):
        mail.message("Archive", 1, size=4000)
    mail.commit()
    with _db(store_root) as conn:  # deleted without a vacuum: free pages stay in the file
        conn.execute("DELETE FROM quarantined_message_raw")
        conn.execute("DELETE FROM quarantined_message")
    with _db(store_root) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] > 500

    result = purge.purge_expired(store_root, now=NOW, pacing=TINY)

    assert result.rows_deleted == 0
    assert result.pages_returned > 500
    with _db(store_root) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_a_progress_callback_that_raises_stops_the_purge_after_a_committed_batch(
    store_root, mail: MailData
):
    for _ in range(50):
        mail.message("Archive", 30)
    mail.commit()

    class Stop(Exception):
        pass

    def progress(state: PurgeProgress) -> None:
        if state.rows_deleted >= 14:
            raise Stop

    with pytest.raises(Stop):
        purge.purge_expired(store_root, now=NOW, pacing=TINY, progress=progress)

    assert len(mail.ids("quarantined_message")) == 50 - 14


def test_the_mail_service_can_write_while_a_purge_runs(store_root, mail: MailData):
    """Between two of the purge's batches the mail service gets the lock, and quickly.

    The purge waits (in its progress report, after each committed batch) until the writer has
    committed once more: the interleaving is proven, not left to how fast the machine is.
    """
    for _ in range(6000):
        mail.message("Spam quarantine", 40, size=3000)
    mail.commit()
    waits: list[float] = []
    wrote = threading.Event()
    done = threading.Event()

    def mail_service() -> None:
        conn = sqlite3.connect(paths.layout(store_root).msgstore_db, timeout=30,
                               isolation_level=None)  # fmt: skip
        while not done.is_set():
            started = time.monotonic()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
                " VALUES (?, '203.0.113.9', 'a@x', 'b@x', '250 ok')",
                (int(NOW.timestamp()),),
            )
            conn.execute("COMMIT")
            waits.append(time.monotonic() - started)
            wrote.set()
            time.sleep(0.005)
        conn.close()

    batches = 0

    def between_batches(state: PurgeProgress) -> None:
        nonlocal batches
        batches += 1
        wrote.clear()
        assert wrote.wait(timeout=10), "the mail service could not write between two batches"

    writer = threading.Thread(target=mail_service)
    writer.start()
    try:
        purge.purge_expired(
            store_root, now=NOW, pacing=Pacing(first_rows=200), progress=between_batches
        )
    finally:
        done.set()
        writer.join()

    assert batches > 5 and len(waits) >= batches
    assert max(waits) < 2.0
    assert mail.ids("quarantined_message") == set()


def test_a_retention_outside_one_day_to_ten_years_is_refused(store_root, mail: MailData):
    with pytest.raises(ValueError):
        retention.store_retention_set(mail.store("Archive"), 0, store_root)
    with pytest.raises(ValueError):
        retention.log_retention_set(smtp_log_days=3651, root=store_root)
    with pytest.raises(KeyError):
        retention.store_retention_set(999, 5, store_root)
    assert retention.store_retention_set(mail.store("Archive"), 7, store_root) == 14
    assert retention.retention_settings(store_root).store(mail.store("Archive")).retention_days == 7
