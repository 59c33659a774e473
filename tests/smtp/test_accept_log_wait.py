"""A message to deliver is answered 250 once it is spooled, even when its log rows are held up.

The worker that spools a message hands its log record straight to the store writer
(smtp.server.MailService.spool_and_log). When the message store is locked by someone else for
longer than the service waits for a record, the client still gets its 250 (the message is safe
in the spool and is delivered), and the rows are written once the lock is gone.
"""

from __future__ import annotations

import smtplib
import sqlite3
import time
from pathlib import Path

import pytest

from appliance.system.paths import layout
from smtp import server
from smtp.server import MailService
from tests.smtp.test_accept_group_fsync import service  # noqa: F401
from tests.support.services import wait_for
from tests.support.smtp import CLIENT_NAME

MESSAGE = (
    "From: colleague@elsewhere.test\r\nTo: user@example.com\r\n"
    "Date: Tue, 01 Oct 2013 12:00:00 +0000\r\nMessage-ID: <held.1@elsewhere.test>\r\n"
    "Subject: status\r\n\r\nAll fine.\r\n"
)


def tracked(root: Path) -> int:
    with sqlite3.connect(layout(root).msgstore_db) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM tracking_log WHERE message_id = '<held.1@elsewhere.test>'"
        ).fetchone()
    return int(count)


def test_a_locked_store_delays_the_log_rows_but_not_the_250(
    service: MailService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "RECORD_TIMEOUT", 0.5)
    lock = sqlite3.connect(layout(service.root).msgstore_db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the store writer now waits for its busy timeout
    try:
        with smtplib.SMTP(
            "127.0.0.1", service.port, local_hostname=CLIENT_NAME, timeout=30
        ) as smtp:
            began = time.monotonic()
            smtp.sendmail("colleague@elsewhere.test", ["user@example.com"], MESSAGE)
            waited = time.monotonic() - began
        assert 0.5 <= waited < 10
        assert tracked(service.root) == 0
        # Spooled before the 250, so it is delivered whatever became of its log rows.
        sink = layout(service.root).mail_sink_dir
        wait_for(lambda: sink.is_dir() and any(sink.iterdir()), message="not delivered")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: tracked(service.root) == 1, message="the log rows were not written")
