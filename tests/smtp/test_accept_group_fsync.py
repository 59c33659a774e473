"""The spool's shared directory fsync, observed: a 250 only after an fsync that covers its file.

Concurrent spool writes share one fsync of the spool directory (smtp.spool.DirectorySync).
These tests watch the real service through the operating system calls it makes (``os.replace``
and ``os.fsync``, wrapped to note the time and to make each directory fsync slow, so that
writers pile up behind it) and through the client's own answers: every message answered 250
was renamed into the spool before a directory fsync *began*, and that fsync had *returned*
before the 250 reached the client.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.system.paths import layout
from smtp.server import MailService
from smtp.spool import directory_sync, spool_write
from tests.support.smtp import CLIENT_NAME

SLOW_FSYNC = 0.05
CLIENTS = 8
MESSAGES_EACH = 3


class DiskWatch:
    """``os.replace`` and ``os.fsync`` as the service calls them, timed (monotonic clock)."""

    def __init__(self, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spool = str(spool)
        self.renamed: dict[str, float] = {}  # final name in the spool -> when the rename returned
        self.dir_fsyncs: list[tuple[float, float]] = []  # (began, returned)
        self._lock = threading.Lock()
        real_replace, real_fsync = os.replace, os.fsync

        def replace(src: object, dst: object, **kwargs: object) -> None:
            real_replace(src, dst, **kwargs)  # type: ignore[arg-type]
            target = Path(os.fsdecode(dst))  # type: ignore[arg-type]
            if str(target.parent) == self.spool:
                with self._lock:
                    self.renamed[target.name] = time.monotonic()

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}") != self.spool:
                real_fsync(fd)
                return
            began = time.monotonic()
            time.sleep(SLOW_FSYNC)  # writers that rename meanwhile queue up behind this one
            real_fsync(fd)
            with self._lock:
                self.dir_fsyncs.append((began, time.monotonic()))

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture
def service(transactional_db: None, demo_appliance: Path) -> Iterator[MailService]:
    """The real service in this process (so its system calls can be watched), on its own loop."""
    mail_service = MailService("127.0.0.1", 0, root=demo_appliance)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(mail_service.start(), loop).result(30)
    yield mail_service
    asyncio.run_coroutine_threadsafe(mail_service.stop(grace=1.0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    mail_service.close()
    loop.close()


def test_each_250_follows_a_directory_fsync_begun_after_its_rename(
    service: MailService, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = layout(service.root).mail_spool_dir
    watch = DiskWatch(spool, monkeypatch)
    answered: list[tuple[str, float]] = []  # (queue id, when the 250 was read)
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(number: int) -> None:
        try:
            with smtplib.SMTP(
                "127.0.0.1", service.port, local_hostname=CLIENT_NAME, timeout=30
            ) as smtp:
                smtp.ehlo()
                start.wait()
                for each in range(MESSAGES_EACH):
                    smtp.mail("colleague@elsewhere.test")
                    smtp.rcpt("user@example.com")
                    code, reply = smtp.data(
                        f"From: colleague@elsewhere.test\r\nTo: user@example.com\r\n"
                        f"Date: Tue, 01 Oct 2013 12:00:00 +0000\r\n"
                        f"Message-ID: <group.{number}.{each}@elsewhere.test>\r\n"
                        f"Subject: status {number}.{each}\r\n\r\nAll fine.\r\n"
                    )
                    read = time.monotonic()
                    assert code == 250, reply
                    answered.append((reply.decode().rsplit(" ", 1)[-1], read))
        except BaseException as exc:  # reported below, from the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(answered) == CLIENTS * MESSAGES_EACH

    for queue_id, read in answered:
        (renamed,) = [at for name, at in watch.renamed.items() if f"-{queue_id}." in name]
        covering = [
            (began, returned)
            for began, returned in watch.dir_fsyncs
            if began >= renamed and returned <= read
        ]
        assert covering, f"{queue_id}: no directory fsync between its rename and its 250"
    # ...and the writers shared them: fewer directory fsyncs than messages.
    spool_writes = [at for name, at in watch.renamed.items() if name.endswith(".eml")]
    assert len(spool_writes) >= CLIENTS * MESSAGES_EACH
    writer_fsyncs = [
        fsync for fsync in watch.dir_fsyncs if fsync[0] <= max(read for _, read in answered)
    ]
    assert len(writer_fsyncs) < CLIENTS * MESSAGES_EACH


def test_a_failed_directory_fsync_fails_that_write_and_the_next_one_fsyncs_again(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = layout(demo_appliance).mail_spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    real_fsync = os.fsync
    calls: list[str] = []

    def failing_once(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(path)
        if path == str(spool) and calls.count(path) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_once)
    before = directory_sync(spool).fsyncs

    with pytest.raises(OSError, match="Input/output error"):
        spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com",), b"Subject: 1\r\n\r\n1\r\n")
    spool_write("BBBBBBBBBB", "a@x.test", ("b@example.com",), b"Subject: 2\r\n\r\n2\r\n")

    assert calls.count(str(spool)) == 2  # the second write did not ride on the failed fsync
    assert directory_sync(spool).fsyncs == before + 1
