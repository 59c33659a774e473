"""The spool's group commit: messages written together share one directory fsync, and fail together.

The mail service spools through one writer thread (smtp.spool.SpoolWriter), which writes
whatever messages wait as one batch (smtp.spool.spool_write_many): each file written,
fsynced and renamed, then one fsync of the directory for all of them. A failure of that fsync
must fail every message of the batch (451, nothing of it left in the spool, no log rows), and a
failure of one message's own write must fail that message only.
"""

from __future__ import annotations

import errno
import os
import smtplib
import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system.paths import layout
from smtp.server import MailService
from smtp.spool import (
    SpoolResult,
    SpoolWriter,
    directory_sync,
    parse_spool_file,
    spool_list,
    spool_write,
    spool_write_many,
)
from tests.smtp.test_accept_group_fsync import service  # noqa: F401
from tests.support.services import wait_for
from tests.support.smtp import CLIENT_NAME, free_port

MESSAGE = b"Received: from x\r\nSubject: hello\r\n\r\nHi.\r\n"


def entries(count: int, body: bytes = MESSAGE) -> list[tuple[str, str, tuple[str, ...], bytes]]:
    return [(f"Q{n:09d}", "a@x.test", ("b@example.com",), body) for n in range(count)]


def spool_names(root: Path | None = None) -> list[str]:
    spool = layout(root).mail_spool_dir
    return sorted(path.name for path in spool.iterdir()) if spool.is_dir() else []


def half_written(root: Path | None = None) -> list[str]:
    """Temporary files in the spool other than the spool writer's empty spare files."""
    spool = layout(root).mail_spool_dir
    return [
        path.name
        for path in spool.iterdir()
        if path.name.startswith(".")
        and not (path.name.startswith(".spare-") and path.stat().st_size == 0)
    ]


def fail_spool_directory_fsync(monkeypatch: pytest.MonkeyPatch, spool: Path) -> list[int]:
    """Every fsync of the spool directory fails with EIO; returns the list the calls go to."""
    real_fsync = os.fsync
    calls: list[int] = []

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(spool):
            calls.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_failed_directory_fsync_fails_every_message_of_the_batch_and_keeps_none(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = layout().mail_spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    calls = fail_spool_directory_fsync(monkeypatch, spool)

    results = spool_write_many(entries(3))

    assert len(calls) == 1  # one fsync for the batch
    assert [type(result) for result in results] == [OSError] * 3
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    assert spool_names() == []  # neither the renamed files nor any temporary one


def test_a_single_write_fails_alone_without_a_temporary_file_left(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if b"disk full for me" in bytes(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com",), MESSAGE)  # the spool exists
    directory = directory_sync(layout().mail_spool_dir)
    fsyncs = directory.fsyncs
    batch = entries(3)
    batch[1] = (batch[1][0], batch[1][1], batch[1][2], MESSAGE + b"disk full for me\r\n")

    first, failed, last = spool_write_many(batch)

    assert isinstance(failed, OSError) and failed.errno == errno.ENOSPC
    assert isinstance(first, Path) and isinstance(last, Path)
    assert parse_spool_file(first, first.read_bytes()).queue_id == "Q000000000"
    assert parse_spool_file(last, last.read_bytes()).queue_id == "Q000000002"
    assert half_written() == []
    assert directory.fsyncs == fsyncs + 1  # the two good ones shared one directory fsync


def test_messages_waiting_together_are_written_as_one_batch(demo_appliance: Path) -> None:
    results: list[SpoolResult] = []
    follow_ups: list[list[object]] = []
    writer = SpoolWriter(after_batch=follow_ups.append)
    for number, entry in enumerate(entries(5)):
        writer.submit(entry, lambda result, n=number: results.append(result) or n)
    fsyncs = directory_sync(layout().mail_spool_dir).fsyncs

    writer.start()  # all five were waiting: one batch
    writer.close()  # writes what is queued, then stops

    assert writer.batches == 1
    assert all(isinstance(result, Path) for result in results)
    assert sorted(results) == spool_list()  # type: ignore[type-var]
    assert follow_ups == [[0, 1, 2, 3, 4]]
    assert directory_sync(layout().mail_spool_dir).fsyncs == fsyncs + 1


def test_files_made_ahead_take_the_next_messages_and_go_at_the_stop(demo_appliance: Path) -> None:
    layout().mail_spool_dir.mkdir(parents=True)
    results: list[SpoolResult] = []
    writer = SpoolWriter(spares=3)
    writer.start()
    wait_for(lambda: len(spare_names()) == 3, message="no spare files made")
    spares = spare_names()

    for entry in entries(2):
        writer.submit(entry, results.append)
    wait_for(lambda: len(results) == 2, message="not spooled")
    left = [name for name in spares if name in spare_names()]
    writer.close()

    assert len(left) == 1  # two of the spares were written and renamed
    assert all(isinstance(result, Path) for result in results)
    assert [parse_spool_file(p, p.read_bytes()).queue_id for p in spool_list()] == [
        "Q000000000",
        "Q000000001",
    ]
    assert spare_names() == []  # removed at the stop


def spare_names() -> list[str]:
    return [name for name in spool_names() if name.startswith(".spare-")]


def test_a_failed_batch_fsync_answers_every_message_of_the_batch_451(
    service: MailService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Delivery fails (nothing listens there), so only the spool writer fsyncs the spool.
    smtp = read_smtp_settings(service.root)
    smtp.next_hop = f"127.0.0.1:{free_port()}"
    write_smtp_settings(smtp, service.root)
    spool = layout(service.root).mail_spool_dir
    real_fsync = os.fsync
    spool_fsyncs: list[str] = []
    release_first = threading.Event()

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") != str(spool):
            real_fsync(fd)
            return
        spool_fsyncs.append("called")
        if len(spool_fsyncs) == 1:
            release_first.wait(30)  # the first batch's fsync waits for the test
        elif len(spool_fsyncs) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replies: dict[str, int] = {}

    def send(name: str) -> None:
        with smtplib.SMTP("127.0.0.1", service.port, local_hostname=CLIENT_NAME, timeout=30) as c:
            c.ehlo()
            c.mail("colleague@elsewhere.test")
            c.rcpt("user@example.com")
            code, _ = c.data(
                f"From: colleague@elsewhere.test\r\nTo: user@example.com\r\n"
                f"Date: Tue, 01 Oct 2013 12:00:00 +0000\r\n"
                f"Message-ID: <{name}@elsewhere.test>\r\nSubject: {name}\r\n\r\nHi.\r\n"
            )
            replies[name] = code

    first = threading.Thread(target=send, args=("first",))
    first.start()
    wait_for(lambda: len(spool_fsyncs) == 1, message="the first batch never fsynced")
    batch = [threading.Thread(target=send, args=(f"batch{n}",)) for n in range(5)]
    for thread in batch:
        thread.start()
    wait_for(lambda: service.spooler.waiting == 5, message="the batch did not gather")
    release_first.set()
    for thread in [first, *batch]:
        thread.join(30)

    assert replies == {"first": 250} | {f"batch{n}": 451 for n in range(5)}
    assert len(spool_fsyncs) == 2
    # Nothing of the failed batch is left in the spool (not even a temporary file), and it
    # has no log rows: its senders send it again.
    assert spool_message_ids(service.root) == ["<first@elsewhere.test>"]
    assert half_written(service.root) == []
    assert tracked_ids(service.root) == ["<first@elsewhere.test>"]

    send("after")  # the next batch fsyncs again

    assert replies["after"] == 250
    assert spool_message_ids(service.root) == ["<after@elsewhere.test>", "<first@elsewhere.test>"]


def spool_message_ids(root: Path) -> list[str]:
    ids = []
    for path in spool_list(root):
        for line in parse_spool_file(path, path.read_bytes()).message.split(b"\r\n"):
            if line.startswith(b"Message-ID: "):
                ids.append(line.split(b" ", 1)[1].decode())
    return sorted(ids)


def tracked_ids(root: Path) -> list[str]:
    with sqlite3.connect(layout(root).msgstore_db) as conn:
        rows = conn.execute(
            "SELECT message_id FROM tracking_log WHERE message_id LIKE '<%@elsewhere.test>'"
        )
        return sorted(str(message_id) for (message_id,) in rows)
