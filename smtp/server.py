"""The mail processing service: an SMTP server that applies the mail policy to every message.

Accepted means kept. The 250 at the end of DATA is sent only after the message is on disk:

* a quarantined message is committed to the message store (raw bytes and row, with the SMTP
  log, tracking log and processing figures in the same transaction) on a connection whose
  commits wait for fsync (``synchronous = FULL``);
* a message to deliver is in the spool (temporary file, fsync, rename, fsync of the directory)
  and the delivery queue takes it from there (see :mod:`smtp.delivery`); its log rows follow
  in their own durable commit.

Anything that fails before that point answers 4xx, so the sender keeps the message and retries.
A SIGKILL at any moment therefore loses nothing that was acknowledged.

Mail is accepted for the local domains from any client, and for any domain only from the SMTP
settings' relay networks: everything else is refused at RCPT with 554 (see
:func:`smtp.engine.check_relay`), logged in the SMTP log like any refused recipient, and counted
into one rolled-up event per :data:`EVENT_ROLLUP_INTERVAL` (:class:`RefusalTally`) so that a
spammer probing for an open relay cannot flood the event log. Viruses and policy rejections go
to the Mail Security events the same way (:class:`VirusTally`, :class:`RejectionTally`), except
that the first after a quiet minute is written at once.

Maintenance mode (and a damaged maintenance file) answers 421 at the greeting, at MAIL FROM and
at the end of DATA, keeping nothing, so senders retry once it is over. A graceful stop closes the
listener, lets transactions in flight finish, and answers 421 to anything new.

Blocking work never runs on the event loop. Messages to deliver are spooled by one spool writer
thread, which writes whatever messages are waiting as one batch behind one fsync of the spool
directory (:class:`smtp.spool.SpoolWriter`); all message store writes go through one writer
thread that commits whatever records are waiting together (:class:`StoreWriter`): two group
commits, so concurrent clients share fsyncs and thread wake-ups. The spool writer hands a
batch's log records to the store writer in one piece, and the store writer wakes the event loop
once for all the records it wrote (:class:`LoopCalls`). The policy checks and the MIME parsing
of a large message run in a thread pool (a small one, up to :data:`INLINE_JUDGE_LIMIT`, is
judged on the loop: a worker would hold the GIL for it all the same), and a plain message's
DATA is read in one piece (:meth:`MailSMTP.smtp_DATA`): the event loop shares the GIL with
those threads, so it does as little per message as it can.

One module of this size on purpose: the SMTP session (aiosmtpd's hooks), the store writer
and the service's lifecycle hold the one promise above (a 250 means the message is on disk),
and each of them is only correct together with the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import queue
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from appliance.mail import mailrecords
from appliance.mail.mailrecords import MailRecord
from appliance.system.errors import ApplianceError
from appliance.system.maintenance import MaintenanceState, maintenance_status
from appliance.system.paths import appliance_root, layout
from events.models import Category, Severity
from smtp.delivery import DeliveryQueue
from smtp.drain import DrainWatch
from smtp.engine import (
    REPLY_TOO_BIG,
    CompiledPolicy,
    PolicyCache,
    PolicyError,
    Verdict,
    check_path_syntax,
    check_recipient,
    check_relay,
    envelope_address,
    evaluate,
    rejection_reason,
)
from smtp.spool import SpoolResult, SpoolWriter, queue_take_batch, spool_lock, spool_write

log = logging.getLogger("lmi.smtp")

REPLY_MAINTENANCE = (
    "421 4.3.2 {host} Service not available, maintenance in progress; try again later"
)
REPLY_SHUTDOWN = "421 4.3.2 {host} Service shutting down; try again later"
REPLY_TEMPFAIL = "451 4.3.0 Temporary local problem; try again later"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
MAX_RECIPIENTS = 1000
# Messages up to this size are judged on the event loop (a few hundred microseconds at most);
# larger ones, whose MIME parsing would hold the loop up, in a worker thread.
INLINE_JUDGE_LIMIT = 64 * 1024
# smtp_DATA reads a message in one piece when its end comes within this many bytes, and its
# lines (without CRLF) are this long at most: well inside aiosmtpd's line limit (1001 with
# CRLF), whose edge cases are left to aiosmtpd.
BULK_DATA_LIMIT = 256 * 1024
BULK_READ = 1024 * 1024
PLAIN_LINE_LIMIT = 990
# Longer than the message store's busy timeout: a commit that waits for a purge is not cut off.
RECORD_TIMEOUT = mailrecords.BUSY_TIMEOUT_MS / 1000 + 30
# How often the service looks for records waited for longer than RECORD_TIMEOUT (at most; a
# quarter of a shorter timeout): one timer for all of them, not one per message.
RECORD_TIMEOUT_CHECK = 1.0
IDLE_TIMEOUT = 300.0
# Within docker stop's default 10 s and the launcher's 15 s: a client still mid-transaction after
# this is cut off, and since it got no 250 it keeps the message and retries.
STOP_GRACE = 8.0
# aiosmtpd answers these itself (SIZE= over the limit at MAIL FROM; too much data at the end of
# DATA); they are reworded with enhanced status codes, and the second is logged as a rejection.
_AIOSMTPD_SIZE_AT_MAIL = "552 Error: message size exceeds fixed maximum message size"
_AIOSMTPD_SIZE_AT_DATA = "552 Error: Too much mail data"
# A path of the common form, ``<local@domain>`` with both parts dot-atoms of plain ASCII, and the
# blanks after it: MailSMTP._getaddr takes it as it is, to aiosmtpd's own result.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*")
# Refused relay attempts, viruses and rejections are summed into at most one event per interval
# and kind, whatever their rate (see EventTally).
EVENT_ROLLUP_INTERVAL = 60.0
# Clients and examples an event names; the count covers them all.
REFUSAL_EVENT_CLIENTS = 20
REFUSAL_EVENT_EXAMPLES = 5


def new_queue_id() -> str:
    """Ten upper-case hex digits, as in the message store's SMTP log."""
    return secrets.token_hex(5).upper()


def received_header(
    helo: str, client_ip: str, hostname: str, queue_id: str, recipients: tuple[str, ...]
) -> bytes:
    """The trace header this service adds on top of every message it accepts."""
    recipient = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    date = format_datetime(datetime.now(tz=UTC))
    text = (
        f"Received: from {helo or 'unknown'} ([{client_ip}])\r\n"
        f"\tby {hostname} (LMI mail security) with ESMTP id {queue_id}{recipient}; {date}\r\n"
    )
    return text.encode("ascii", errors="replace")


class EventTally:
    """Occurrences of one kind since the last event about them: the event log's roll-up.

    Whatever their rate, occurrences cost at most one summary event per interval (the service
    calls :meth:`take` every :data:`EVENT_ROLLUP_INTERVAL`), so a flood of mail cannot drown the
    event log. With ``immediate`` the first occurrence after a quiet interval is not counted
    but written at once (:meth:`add` returns True): an administrator learns of the first virus
    now, and of the next fifty in one summary. Each occurrence is also in the SMTP and tracking
    logs, one row per recipient, as before.

    Used on the event loop only, so without a lock.
    """

    noun = "occurrence(s)"
    count_key = "count"
    group_key = "groups"

    def __init__(self, *, immediate: bool = False) -> None:
        self.immediate = immediate
        self.last_event_at: float | None = None  # time.monotonic() of the last event written
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.groups: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []
        self.since: datetime | None = None

    def add(self, group: str, example: dict[str, str], now: float | None = None) -> bool:
        """Count one occurrence; True when it is to be written as an event of its own now."""
        now = time.monotonic() if now is None else now
        if (
            self.immediate
            and not self.count
            and (self.last_event_at is None or now - self.last_event_at >= EVENT_ROLLUP_INTERVAL)
        ):
            self.last_event_at = now
            return True
        if self.since is None:
            self.since = datetime.now(tz=UTC)
        self.count += 1
        self.groups[group] += 1
        if len(self.examples) < REFUSAL_EVENT_EXAMPLES:
            self.examples.append(example)
        return False

    def summary(self, since: datetime) -> str:
        """The summary event's message (``self.count`` and ``self.groups`` hold the figures)."""
        groups = ", ".join(f"{name}: {count}" for name, count in self.groups.most_common(5))
        more = ", ..." if len(self.groups) > 5 else ""
        return f"{self.count} {self.noun} since {since:%H:%M:%S} UTC ({groups}{more})"

    def take(self, now: float | None = None) -> tuple[str, dict[str, object]] | None:
        """The summary event's message and details for what was counted, and start counting
        anew; None when nothing was counted."""
        if not self.count or self.since is None:
            return None
        self.last_event_at = time.monotonic() if now is None else now
        details: dict[str, object] = {
            self.count_key: self.count,
            self.group_key: dict(self.groups.most_common(REFUSAL_EVENT_CLIENTS)),
            f"other_{self.group_key}": max(0, len(self.groups) - REFUSAL_EVENT_CLIENTS),
            "examples": self.examples,
            "since": self.since.isoformat(),
            "until": datetime.now(tz=UTC).isoformat(),
        }
        message = self.summary(self.since)
        self._reset()
        return message, details


class RefusalTally(EventTally):
    """Recipients refused with "Relay access denied" since the last event about them.

    The refusal itself is in the SMTP log (one row per recipient, as for any refusal); the event
    log gets one summary per interval, so an administrator sees that someone is probing the
    relay without thousands of events drowning the rest.
    """

    count_key = "refused"
    group_key = "clients"

    def add_refusal(self, client_ip: str, sender: str, recipient: str) -> None:
        self.add(client_ip, {"client": client_ip, "sender": sender, "recipient": recipient})

    @property
    def refused(self) -> int:
        return self.count

    def summary(self, since: datetime) -> str:
        return (
            f"Relay access denied (554) to {self.count} recipient(s) from {len(self.groups)} "
            f"client(s) since {since:%H:%M:%S} UTC: the appliance accepts mail for its "
            "local domains, and for others only from its relay networks"
        )


class VirusTally(EventTally):
    """Messages quarantined for a virus, by virus name: the first at once, then summaries."""

    noun = "message(s) with a virus quarantined"
    count_key = "messages"
    group_key = "viruses"

    def __init__(self) -> None:
        super().__init__(immediate=True)


class RejectionTally(EventTally):
    """Messages and recipients the mail policy rejected, by reason: the first at once, then
    summaries."""

    noun = "rejection(s) by the mail policy"
    count_key = "rejected"
    group_key = "reasons"

    def __init__(self) -> None:
        super().__init__(immediate=True)


@dataclass(frozen=True)
class Processed:
    """The policy's verdict on a message and, when accepted, what was stored."""

    verdict: Verdict
    queue_id: str
    message: bytes  # with the Received header
    spool_path: Path | None = None

    @property
    def reply(self) -> str:
        """What the client is answered at the end of DATA."""
        return self.verdict.reply or REPLY_QUEUED.format(queue_id=self.queue_id)


class LoopCalls:
    """Calls from other threads to the event loop, one wake-up for all that come together.

    ``loop.call_soon_threadsafe`` writes to the loop's wake-up pipe on every call: a system
    call in the calling thread and a wake-up of the loop, with the GIL changing hands, per
    message. A call posted while the loop has not yet run the ones before it rides along with
    them, so the store writer, setting the results of a batch of records one after the other,
    wakes the loop once for the batch.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def post(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function(*args)`` on the loop soon; from any thread (dropped once it closed)."""
        with self._lock:
            self._calls.append((function, args))
            if len(self._calls) > 1:
                return  # the wake-up of the first one is still to come, and runs this one too
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._run)

    def future(self, future: concurrent.futures.Future[Any]) -> asyncio.Future[Any]:
        """A future of the loop with ``future``'s outcome, as ``asyncio.wrap_future`` makes
        one but woken through :meth:`post`; cancelling it cancels ``future``."""
        waiter: asyncio.Future[Any] = self._loop.create_future()

        def copy(done: concurrent.futures.Future[Any]) -> None:  # on the loop
            if waiter.done():
                return
            if done.cancelled():
                waiter.cancel()
            elif (exc := done.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())

        def cancelled(waited: asyncio.Future[Any]) -> None:
            if waited.cancelled():
                future.cancel()

        future.add_done_callback(functools.partial(self.post, copy))
        waiter.add_done_callback(cancelled)
        return waiter

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for function, args in calls:
            try:
                function(*args)
            except Exception:
                log.exception("a call from a worker thread failed on the event loop")


@dataclass(eq=False)
class _RecordWait:
    """A record submitted to the store writer and waited for on the loop: the future is set
    (by whichever thread submits it) once it is submitted, and ``expire`` answers the waiter
    when it takes longer than ``RECORD_TIMEOUT`` (see :meth:`MailService.expire_record_waits`)."""

    expire: Callable[[], None]
    future: concurrent.futures.Future[int | None] | None = None
    submitted_at: float = 0.0


# A spooled message's log record, and what to call with the record's future once it is submitted.
_SpooledRecord = tuple[MailRecord, Callable[[concurrent.futures.Future[int | None]], None]]


class StoreWriter:
    """The one thread that writes the message store; records waiting together share a commit."""

    def __init__(self, root: Path, max_batch: int = 128) -> None:
        self._root = root
        self._max_batch = max_batch
        # One record and its future, several (submit_many), or None to stop.
        self._queue: queue.SimpleQueue[
            tuple[MailRecord, concurrent.futures.Future[int | None]]
            | list[tuple[MailRecord, concurrent.futures.Future[int | None]]]
            | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="msgstore-writer", daemon=True)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()

    def start(self) -> None:
        """Open the store in the writer thread; raises what opening it raised."""
        self._thread.start()
        self._ready.result()

    def submit(self, record: MailRecord) -> concurrent.futures.Future[int | None]:
        future: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        self._queue.put((record, future))
        return future

    def submit_many(self, records: list[MailRecord]) -> list[concurrent.futures.Future[int | None]]:
        """:meth:`submit` for several records at once: they go in one commit (the writer
        takes them up together, with whatever else is waiting)."""
        futures: list[concurrent.futures.Future[int | None]] = [
            concurrent.futures.Future() for _ in records
        ]
        self._queue.put(list(zip(records, futures, strict=True)))
        return futures

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _store_identity(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the store file: changes when the upgrade swaps a new one in."""
        try:
            stat = os.stat(layout(self._root).msgstore_db)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _run(self) -> None:
        try:
            identity = self._store_identity()
            conn = mailrecords.connect_writer(self._root)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch, stop = queue_take_batch(self._queue, item, self._max_batch)
                # A record whose caller gave up waiting (and answered 4xx) is not written.
                batch = [entry for entry in batch if entry[1].set_running_or_notify_cancel()]
                if batch:
                    # A connection keeps writing to the file it opened, even after the
                    # message store upgrade renamed a converted store over it: those
                    # writes would be lost. One stat per batch notices the swap.
                    current = self._store_identity()
                    if current is not None and current != identity:
                        try:
                            fresh = mailrecords.connect_writer(self._root)
                        except Exception as exc:
                            for _, future in batch:
                                future.set_exception(exc)
                            batch = []
                        else:
                            conn.close()
                            conn, identity = fresh, current
                    if batch:
                        self._write(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    @staticmethod
    def _write(
        conn: sqlite3.Connection,
        batch: list[tuple[MailRecord, concurrent.futures.Future[int | None]]],
    ) -> None:
        try:
            ids = mailrecords.mail_record_many(conn, [record for record, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # One bad record must not fail the others: write them one by one.
            for record, future in batch:
                try:
                    future.set_result(mailrecords.mail_record_many(conn, [record])[0])
                except Exception as single:
                    future.set_exception(single)
            return
        for (_, future), quarantine_id in zip(batch, ids, strict=True):
            future.set_result(quarantine_id)


class MailSMTP(SMTP):
    """One client connection: aiosmtpd's protocol plus maintenance at the greeting, reworded
    size replies, and what a graceful stop needs to know about the connection."""

    def __init__(self, service: MailService, handler: MailHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.service = service
        self.bytes_in = 0
        self._data_started_at = 0
        self.policy: CompiledPolicy | None = None  # as of the current transaction's MAIL FROM
        self._resend_354 = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.service.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.service.connections.discard(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)

    # aiosmtpd only hands the handler the parsed address, by then without the brackets that
    # were missing and with the NUL that was there: the raw argument is checked here. The
    # states aiosmtpd answers 503 to (no EHLO, nested MAIL, RCPT before MAIL) are left to it.
    @functools.wraps(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str | None) -> None:
        path = self._path_argument("FROM:", arg)
        if path is not None and self.envelope is not None and not self.envelope.mail_from:
            refusal = check_path_syntax(path, recipient=False)
            if refusal is not None:
                await self.push(refusal)
                return
        await super().smtp_MAIL(arg)

    @functools.wraps(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str | None) -> None:
        path = self._path_argument("TO:", arg)
        if path is not None and self.envelope is not None and self.envelope.mail_from:
            refusal = check_path_syntax(path, recipient=True)
            if refusal is not None:
                await self.push(refusal)
                return
        await super().smtp_RCPT(arg)

    @functools.wraps(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, with the message read in bulk rather than line by line.

        aiosmtpd reads the message one line at a time (a coroutine step, a debug log call
        and a few list operations per line: for a message of a hundred lines, a good part of
        what the event loop does per message). When the message is plain (its end in the
        first :data:`BULK_DATA_LIMIT` bytes, no line near the line length limit, within the
        size limit) it is read and unstuffed in one piece here, to the same bytes; anything
        else (and every error reply) is left to aiosmtpd's own code, which gets the bytes
        read so far back in front of its reader, so that its answers stay exactly its own.
        """
        envelope, session = self.envelope, self.session
        if (
            arg
            or envelope is None
            or session is None
            or not session.host_name
            or not envelope.rcpt_tos
            or self._decode_data
            or self._auth_required
        ):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        received = bytearray()
        try:
            while True:
                chunk = await self._reader.read(BULK_READ)
                if not chunk:  # the client went away (aiosmtpd cancels us first, as a rule)
                    self._writer.close()
                    return
                received += chunk
                end = _end_of_data(received)
                if end >= 0 or len(received) > BULK_DATA_LIMIT:
                    break
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        content = _plain_content(received, end, self.data_size_limit)
        if content is None:
            # aiosmtpd's own loop reads it all again (what it would have read) and answers;
            # the reader is empty (read() took what it held), so the bytes go back in order.
            self._reader.feed_data(bytes(received))
            self._resend_354 = False
            await super().smtp_DATA(arg)
            return
        if end + 3 < len(received):  # pipelined commands after the end of the data
            self._reader.feed_data(bytes(received[end + 3 :]))
        envelope.content = envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing, with a plain ``<local@domain>`` taken as it is.

        aiosmtpd runs the e-mail header parser on every MAIL FROM and RCPT TO, and defines a
        class (a ``typing.Protocol``) on each call: about 55 microseconds of the event loop per
        path, a sixth of what it did per message, where a plain path needs one regular
        expression. Anything else (quoted or non-ASCII local parts, domain literals, source
        routes, comments, the null path) still goes to aiosmtpd, so its answers stay its own;
        tests/smtp/test_paths.py holds the two to the same results.
        """
        match = _PLAIN_PATH.match(arg)
        if match is None or arg.startswith("(", match.end()):
            return super()._getaddr(arg)
        address = match.group(1)
        if self.local_part_limit and address.rindex("@") > self.local_part_limit:
            return None, None
        return address, arg[match.end() :]

    def _path_argument(self, keyword: str, arg: str | None) -> str | None:
        """What follows ``FROM:``/``TO:`` once the client has greeted, else None."""
        if arg is None or self.session is None or not self.session.host_name:
            return None
        return self._strip_command_keyword(keyword, arg)

    @property
    def in_transaction(self) -> bool:
        """Between an accepted MAIL FROM and the end of its DATA (or RSET)."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_for_shutdown(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self._writer.write(REPLY_SHUTDOWN.format(host=self.hostname).encode() + b"\r\n")
            self.transport.close()

    # aiosmtpd 1.4.6 (pinned) sends the greeting at the top of this coroutine.
    async def _handle_client(self) -> None:
        refusal = self.service.refusal(greeting=True)
        if refusal is not None:
            await self.push(refusal)
            return
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if status.startswith("354"):
                if not self._resend_354:  # already sent by smtp_DATA before it gave way
                    self._resend_354 = True
                    return
                self._data_started_at = self.bytes_in
            elif status == _AIOSMTPD_SIZE_AT_MAIL:
                status = REPLY_TOO_BIG.format(limit=self.data_size_limit)
            elif status == _AIOSMTPD_SIZE_AT_DATA:
                status = REPLY_TOO_BIG.format(limit=self.data_size_limit)
                size = max(0, self.bytes_in - self._data_started_at - 3)
                await self.service.handler.log_oversize(self, status, size)
        await super().push(status)
        if isinstance(status, str) and status.startswith("421") and self.transport is not None:
            # 421 closes the channel (RFC 5321 3.8); the sender retries later.
            self.transport.close()


def _end_of_data(received: bytearray) -> int:
    """Where the line ``.`` that ends the data starts in ``received``, or -1."""
    if received.startswith(b".\r\n"):
        return 0
    found = received.find(b"\r\n.\r\n")
    return found + 2 if found >= 0 else -1


def _plain_content(received: bytearray, end: int, size_limit: int | None) -> bytes | None:
    """The message in ``received[:end]`` unstuffed, as aiosmtpd would make it; None when it
    is not plain (no end yet, a line near the length limit, over the size limit)."""
    if end < 0 or (size_limit and end > size_limit):
        return None
    data = bytes(received[:end])
    if data and max(map(len, data.split(b"\r\n"))) > PLAIN_LINE_LIMIT:
        return None
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


class MailHandler:
    """aiosmtpd's handler hooks: MAIL FROM, RCPT TO and the end of DATA."""

    def __init__(self, service: MailService) -> None:
        self.service = service

    async def handle_MAIL(
        self,
        server: MailSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        refusal = self.service.refusal(sender=address)
        if refusal is not None:
            return refusal
        if self.service.is_probe(address):
            envelope.mail_from = address
            return "250 2.1.0 Ok"
        try:
            policy = server.policy = self.service.policy()
        except PolicyError:
            return REPLY_TEMPFAIL
        for option in options:
            name, _, value = option.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > policy.max_message_size:
                return REPLY_TOO_BIG.format(limit=policy.max_message_size)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: MailSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return REPLY_TOO_MANY_RECIPIENTS
        if self.service.is_probe(envelope.mail_from):
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"
        # The policy of this transaction's MAIL FROM, milliseconds old.
        policy = server.policy
        if policy is None:
            return REPLY_TEMPFAIL
        client_ip = _client_ip(session)
        # Before the lists: an allow-listed sender is only what the client claims, and must not
        # open the relay.
        reply = check_relay(policy, client_ip, address)
        if reply is not None:
            self.service.relay_refusals.add_refusal(
                client_ip, envelope_address(envelope.mail_from or ""), envelope_address(address)
            )
            await self.service.record_quietly(
                self._record(session, envelope, (address,), reply, "policy", "rejected")
            )
            return reply
        reply = check_recipient(policy, envelope.mail_from or "", address)
        if reply is not None:
            await self.service.record_quietly(
                self._record(session, envelope, (address,), reply, "policy", "rejected")
            )
            self.service.mail_rejected(
                client_ip, envelope_address(envelope.mail_from or ""), (address,), reply
            )
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: MailSMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        # Maintenance may have begun since MAIL FROM: keep nothing, the sender retries.
        refusal = self.service.refusal(in_transaction=True, sender=envelope.mail_from)
        if refusal is not None:
            return refusal
        if self.service.is_probe(envelope.mail_from):
            return await self._probe(session, envelope, started)
        loop = asyncio.get_running_loop()
        args = (
            session.host_name or "",
            _client_ip(session),
            envelope.mail_from or "",
            tuple(envelope.rcpt_tos),
            envelope.original_content or b"",
            server.policy,
        )
        try:
            if len(args[4]) <= INLINE_JUDGE_LIMIT:
                # A small message is judged right here: ~0.1 ms of Python, which a worker
                # thread would spend holding the GIL all the same, while the event loop waited
                # for it at each of its own system calls. Only the spool write, which waits for
                # the disk without the GIL, goes to a thread.
                processed = self.service.judge(*args)
                if processed.verdict.action == "delivered":
                    return await self._spool_and_log(session, envelope, processed, started)
            else:
                processed = await loop.run_in_executor(
                    self.service.work_pool, self.service.process, *args
                )
        except PolicyError as exc:
            self.service.policy_failed(exc)
            return REPLY_TEMPFAIL
        except OSError:
            log.exception("the message could not be spooled; answered 451")
            return REPLY_TEMPFAIL
        verdict = processed.verdict
        reply = processed.reply
        record = self._processed_record(session, envelope, processed, started)
        if verdict.action == "quarantined":
            # The copy in the message store is the only one: no 250 before it is committed.
            try:
                await self.service.record(record)
            except Exception:  # TimeoutError included
                log.exception("quarantine of %s failed; answered 451", processed.queue_id)
                return REPLY_TEMPFAIL
            if verdict.verdict == "virus":
                self.service.mail_virus(record.client_ip, record.sender, record.recipients, verdict)
            return reply
        if verdict.action == "rejected":
            self.service.mail_rejected(record.client_ip, record.sender, record.recipients, reply)
        if processed.spool_path is not None:
            # Already durable in the spool: from here on, nothing may turn this into a 4xx.
            self.service.delivery.submit(processed.spool_path)
        await self.service.record_quietly(record)
        return reply

    async def _spool_and_log(
        self, session: Session, envelope: Envelope, processed: Processed, started: float
    ) -> str:
        """A judged message to deliver: spooled, its log rows committed, then 250.

        What :meth:`handle_DATA` does for any message, in one trip through the threads: the
        spool writer hands the log records of the batch it spooled straight to the store
        writer, and the store writer wakes the event loop once the rows are in, instead of
        the spool writer waking it only for it to hand the records on (each wake-up is a
        thread switch, and the GIL changing hands). The answers are the same: 451 when the
        spool write fails (for every message of the batch, when the batch's directory fsync
        does), else 250 once the rows are committed, or once waiting for them failed or took
        ``RECORD_TIMEOUT`` (the message is safe in the spool; the failure is logged).
        """
        recipients = tuple(envelope.rcpt_tos)

        def record_for(spooled: Processed) -> MailRecord:
            return self._processed_record(session, envelope, spooled, started)

        try:
            spooled, failure = await self.service.spool_and_log(
                processed, envelope.mail_from or "", recipients, record_for
            )
        except OSError:
            log.exception("the message could not be spooled; answered 451")
            return REPLY_TEMPFAIL
        # Durable in the spool: from here on, nothing may turn this into a 4xx.
        assert spooled.spool_path is not None
        self.service.delivery.submit(spooled.spool_path)
        if failure is not None:
            log.error(
                "the SMTP and tracking log rows of %s were not written",
                envelope_address(envelope.mail_from or ""),
                exc_info=failure,
            )
        return spooled.reply

    def _processed_record(
        self, session: Session, envelope: Envelope, processed: Processed, started: float
    ) -> MailRecord:
        """The record of a judged message (quarantines carry the message itself)."""
        verdict = processed.verdict
        quarantined = verdict.action == "quarantined"
        return self._record(
            session,
            envelope,
            tuple(envelope.rcpt_tos),
            processed.reply,
            verdict.verdict,
            verdict.action,
            message_id=verdict.message_id or f"<{processed.queue_id}@{self.service.hostname}>",
            subject=verdict.subject,
            size=len(processed.message),
            processing_ms=round((time.perf_counter() - started) * 1000),
            store_name=verdict.store if quarantined else None,
            raw=processed.message if quarantined else None,
        )

    async def _probe(self, session: Session, envelope: Envelope, started: float) -> str:
        """The upgrade's health probe: tracked through the real store writer, never delivered.

        It proves what the health check needs (the service answers, the policy loads, and the
        writer commits to the message store now on disk) without sending mail anywhere.
        """
        queue_id = new_queue_id()
        reply = REPLY_QUEUED.format(queue_id=queue_id)
        content = envelope.original_content or b""
        record = self._record(
            session,
            envelope,
            tuple(envelope.rcpt_tos),
            reply,
            "clean",
            "delivered",
            message_id=f"<{queue_id}.upgrade-probe@{self.service.hostname}>",
            subject="upgrade health probe",
            size=len(content),
            processing_ms=round((time.perf_counter() - started) * 1000),
        )
        try:
            self.service.policy()  # a policy that cannot be applied fails the probe
            await self.service.record(record)
        except Exception:
            log.exception("the upgrade health probe could not be recorded; answered 451")
            return REPLY_TEMPFAIL
        return reply

    async def log_oversize(self, server: MailSMTP, reply: str, size: int) -> None:
        """aiosmtpd refused a message over the size limit during DATA: log it like ours."""
        envelope, session = server.envelope, server.session
        if envelope is None or session is None or not envelope.rcpt_tos:
            return
        record = self._record(
            session, envelope, tuple(envelope.rcpt_tos), reply, "policy", "rejected", size=size
        )
        await self.service.record_quietly(record)
        self.service.mail_rejected(record.client_ip, record.sender, record.recipients, reply)

    @staticmethod
    def _record(
        session: Session,
        envelope: Envelope,
        recipients: tuple[str, ...],
        reply: str,
        verdict: str,
        action: str,
        **fields: Any,
    ) -> MailRecord:
        values: dict[str, Any] = {"message_id": "", "subject": "", "size": 0} | fields
        return MailRecord(
            logged_at=int(time.time()),
            client_ip=_client_ip(session),
            sender=envelope_address(envelope.mail_from or ""),
            recipients=tuple(envelope_address(recipient) for recipient in recipients),
            response=reply,
            verdict=verdict,
            action=action,
            **values,
        )


def _client_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def appliance_hostname(root: Path | None = None) -> str:
    """The appliance's host name (``etc/HOSTNAME``), for the banner and trace headers.

    Read from the appliance, never looked up: resolving names is not this service's business.
    """
    try:
        name = layout(root).hostname_file.read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    return name.split()[0] if name else "localhost"


class MailService:
    """The SMTP listener, its policy, the message store writer and the delivery queue."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        root: Path | None = None,
        hostname: str | None = None,
        retry_base: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.root = appliance_root(root)
        self.hostname = hostname or appliance_hostname(self.root)
        self._maintenance_file = str(layout(self.root).maintenance_file)
        self.stopping = False
        self.connections: set[MailSMTP] = set()
        self.handler = MailHandler(self)
        self.policies = PolicyCache()
        self.work_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="smtp-work")
        self._delivery_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="smtp-delivery")
        self._event_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smtp-events")
        self._writer = StoreWriter(self.root)
        self.spooler = SpoolWriter(self.root, after_batch=self._submit_spooled_records)
        self._calls: LoopCalls
        self._record_waits: set[_RecordWait] = set()  # on the loop only
        self._record_watch: asyncio.Task[None] | None = None
        self._retry_base = retry_base
        self._spool_lock: int | None = None
        self._server: asyncio.Server | None = None
        self._policy_errors: set[str] = set()
        self.relay_refusals = RefusalTally()
        self.viruses = VirusTally()
        self.rejections = RejectionTally()
        self._refusal_reporter: asyncio.Task[None] | None = None
        self._drain_watch: asyncio.Task[None] | None = None
        self.delivery: DeliveryQueue

    # --- Life cycle ---------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Open the message store, lock and recover the spool, and listen; return the address."""
        self._spool_lock = spool_lock(self.root)
        self._calls = LoopCalls(asyncio.get_running_loop())
        self._writer.start()
        self.delivery = DeliveryQueue(
            self._delivery_pool,
            root=self.root,
            hostname=self.hostname,
            retry_base=self._retry_base,
            on_event=self.event,
        )
        recovered = self.delivery.start()  # sweeps what a crash left, spare files included
        self.spooler.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host=self.host, port=self.port, reuse_address=True
        )
        bound = self._server.sockets[0].getsockname()
        self.port = int(bound[1])
        self._refusal_reporter = asyncio.create_task(self._report_rollups(), name="rollup-events")
        watch = DrainWatch(
            self.root,
            self.maintenance,
            lambda: sum(1 for connection in self.connections if connection.in_transaction),
        )
        self._drain_watch = asyncio.create_task(watch.run(), name="drain-watch")
        self._record_watch = asyncio.create_task(self._watch_record_waits(), name="record-watch")
        if recovered:
            log.info("%d message(s) left in the spool are being delivered", recovered)
        return self.host, self.port

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, let transactions in flight finish (up to ``grace`` s), then close."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            for connection in list(self.connections):
                if not connection.in_transaction:
                    connection.close_for_shutdown()
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        for task in (self._refusal_reporter, self._drain_watch, self._record_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.report_rollups()  # what the last interval counted is not lost
        if hasattr(self, "delivery"):
            await self.delivery.stop()
        await loop.run_in_executor(None, self.spooler.close)  # its last records go to...
        await loop.run_in_executor(None, self._writer.close)  # ...the store writer, then it stops
        self.work_pool.shutdown(wait=True)
        self._delivery_pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Release what outlives the event loop: the event thread and the spool lock."""
        self._event_pool.submit(_close_database_connections)
        self._event_pool.shutdown(wait=True)
        if self._spool_lock is not None:
            os.close(self._spool_lock)
            self._spool_lock = None

    async def serve_until_signalled(
        self, on_ready: Callable[[str, int], None] | None = None
    ) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully; events mark start and stop."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            host, port = await self.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        await self.event_async(
            f"SMTP service started on {host}:{port}",
            Severity.INFO,
            {
                "host": host,
                "port": port,
                "hostname": self.hostname,
                "spooled": self.delivery.pending,
            },
        )
        if on_ready is not None:
            on_ready(host, port)
        await stop.wait()
        await self.stop()
        await self.event_async(
            f"SMTP service stopped on {host}:{port}",
            Severity.INFO,
            {"host": host, "port": port, "still_spooled": self.delivery.pending},
        )

    def _protocol(self) -> MailSMTP:
        try:
            limit = self.policies.get(self.root).max_message_size
        except PolicyError:
            limit = None  # MAIL FROM answers 451 until the policy is readable again
        return MailSMTP(
            self,
            self.handler,
            data_size_limit=limit,
            hostname=self.hostname,
            ident="ESMTP LMI mail security",
            timeout=IDLE_TIMEOUT,
            loop=asyncio.get_running_loop(),
        )

    async def _report_rollups(self) -> None:
        while True:
            await asyncio.sleep(EVENT_ROLLUP_INTERVAL)
            self.report_rollups()

    def report_rollups(self) -> None:
        """Write the summary event of each kind counted since its last event, if any."""
        for tally, severity, category in (
            (self.relay_refusals, Severity.WARNING, Category.SMTP),
            (self.viruses, Severity.WARNING, Category.MAIL),
            (self.rejections, Severity.INFO, Category.MAIL),
        ):
            summary = tally.take()
            if summary is not None:
                message, details = summary
                self.event(message, severity, details, category)

    def mail_virus(
        self, client_ip: str, sender: str, recipients: tuple[str, ...], verdict: Verdict
    ) -> None:
        """A message was quarantined for a virus: a Mail Security event, rolled up."""
        virus = verdict.reasons[0] if verdict.reasons else "unknown virus"
        example = {
            "client": client_ip,
            "sender": sender,
            "recipients": ", ".join(recipients),
            "subject": verdict.subject,
            "virus": virus,
            "store": verdict.store or "",
        }
        if self.viruses.add(virus, example):
            self.event(
                f"Virus {virus} found in a message from {sender or '<>'} to "
                f"{_recipients_text(recipients)}: quarantined in {verdict.store}",
                Severity.WARNING,
                example,
                Category.MAIL,
            )

    def mail_rejected(
        self, client_ip: str, sender: str, recipients: tuple[str, ...], reply: str
    ) -> None:
        """The mail policy rejected a message or a recipient: a Mail Security event, rolled up."""
        reason = rejection_reason(reply)
        example = {
            "client": client_ip,
            "sender": sender,
            "recipients": ", ".join(recipients),
            "reason": reason,
            "response": reply,
        }
        if self.rejections.add(reason, example):
            self.event(
                f"Mail from {sender or '<>'} to {_recipients_text(recipients)} rejected "
                f"({reason}): {reply}",
                Severity.INFO,
                example,
                Category.MAIL,
            )

    # --- Used by the handler ------------------------------------------------------------------

    def refusal(
        self, *, in_transaction: bool = False, greeting: bool = False, sender: str | None = None
    ) -> str | None:
        """The 421 to answer instead of going on, or None to go on.

        While the upgrade's health probe is open (a token in maintenance.json) the greeting goes
        through, and MAIL FROM and DATA refuse everything but the probe's own sender.
        """
        if self.stopping and not in_transaction:
            return REPLY_SHUTDOWN.format(host=self.hostname)
        try:
            state = self.maintenance()
        except (ApplianceError, OSError):
            return REPLY_MAINTENANCE.format(host=self.hostname)  # damaged: still maintenance
        if state is not None:
            if (greeting and state.probe) or state.admits(sender):
                return None
            return REPLY_MAINTENANCE.format(host=self.hostname)
        return None

    def maintenance(self) -> MaintenanceState | None:
        """:func:`maintenance_status`, asked twice per message: while there is no maintenance
        file (nearly always) one ``stat`` says so, without building paths or opening anything.
        Nothing is cached, so a maintenance begun a moment ago applies to the next command."""
        try:
            os.stat(self._maintenance_file)
        except FileNotFoundError:
            return None
        return maintenance_status(self.root)

    def is_probe(self, sender: str | None) -> bool:
        """True for the upgrade's health probe while maintenance admits it."""
        if not sender or not sender.strip("<>").lower().startswith("upgrade-probe+"):
            return False
        try:
            state = self.maintenance()
        except (ApplianceError, OSError):
            return False
        return state is not None and state.admits(sender)

    def policy(self) -> CompiledPolicy:
        """The compiled policy: a few ``stat`` calls while nothing changed, so it is read on
        the event loop; after a change the recompile blocks it for a few milliseconds once."""
        try:
            return self.policies.get(self.root)
        except PolicyError as exc:
            self.policy_failed(exc)
            raise

    def policy_failed(self, exc: PolicyError) -> None:
        """Report a policy that cannot be applied, once per distinct problem."""
        problem = str(exc)
        if problem not in self._policy_errors:
            self._policy_errors.add(problem)
            log.error("mail is answered 451 until this is fixed: %s", problem)
            self.event(
                f"The mail policy cannot be applied; mail is deferred (451): {problem}",
                Severity.ERROR,
                {"error": problem},
            )

    def judge(
        self,
        helo: str,
        client_ip: str,
        sender: str,
        recipients: tuple[str, ...],
        content: bytes,
        policy: CompiledPolicy | None = None,
    ) -> Processed:
        """Judge the message and give it its queue id and trace header; nothing is stored.

        ``policy`` is the one the transaction's MAIL FROM and RCPT TO were checked against
        (milliseconds old): judging the whole transaction by one policy is consistent, and
        spares a second look at the configuration files per message.
        """
        if policy is None:
            policy = self.policies.get(self.root)
        verdict = evaluate(policy, sender, recipients, content)
        queue_id = new_queue_id()
        message = received_header(helo, client_ip, self.hostname, queue_id, recipients) + content
        return Processed(verdict, queue_id, message)

    def spool(self, processed: Processed, sender: str, recipients: tuple[str, ...]) -> Processed:
        """In a worker thread: put a message to deliver in the spool (durably)."""
        path = spool_write(
            processed.queue_id, envelope_address(sender), recipients, processed.message, self.root
        )
        return dataclasses.replace(processed, spool_path=path)

    def process(
        self,
        helo: str,
        client_ip: str,
        sender: str,
        recipients: tuple[str, ...],
        content: bytes,
        policy: CompiledPolicy | None = None,
    ) -> Processed:
        """In a worker thread: :meth:`judge` the message and, when it is to be delivered,
        :meth:`spool` it."""
        processed = self.judge(helo, client_ip, sender, recipients, content, policy)
        if processed.verdict.action == "delivered":
            processed = self.spool(processed, sender, recipients)
        return processed

    async def spool_and_log(
        self,
        processed: Processed,
        sender: str,
        recipients: tuple[str, ...],
        record_for: Callable[[Processed], MailRecord],
    ) -> tuple[Processed, BaseException | None]:
        """Spool the message through the spool writer, which then submits
        ``record_for(spooled)`` to the store writer with the rest of its batch's records;
        return the spooled message once the store writer is done with the record, with why it
        was not written (None when it was).

        Raises what the spool write raised (nothing was submitted then). Waiting for the
        record is given up ``RECORD_TIMEOUT`` after it was submitted (give or take
        ``RECORD_TIMEOUT_CHECK``), as :meth:`record` does (a record the writer has not taken
        up yet is then dropped); the spool write itself is waited for however long it takes.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[Processed, BaseException | None]] = loop.create_future()
        spooled_as: list[Processed] = []  # set in the spool writer's thread, before the future

        def settle(result: tuple[Processed, BaseException | None] | BaseException) -> None:
            if done.done():  # the client went away, or the timeout answered already
                return
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)

        def expire() -> None:  # on the loop
            error = TimeoutError("the message store writer did not answer in time")
            settle((spooled_as[0], error))

        wait = _RecordWait(expire)

        def written(spooled: Processed, future: concurrent.futures.Future[int | None]) -> None:
            # In the store writer's thread (or the spool writer's, when it was done already).
            failure = (
                concurrent.futures.CancelledError() if future.cancelled() else future.exception()
            )
            self._calls.post(settle, (spooled, failure))

        def submitted(spooled: Processed, future: concurrent.futures.Future[int | None]) -> None:
            # In the spool writer's thread: from now on the wait for the record is limited.
            wait.submitted_at = time.monotonic()
            wait.future = future
            future.add_done_callback(functools.partial(written, spooled))

        def on_disk(result: SpoolResult) -> _SpooledRecord | None:  # in the spool writer's thread
            if isinstance(result, Exception):
                self._calls.post(settle, result)
                return None
            spooled = dataclasses.replace(processed, spool_path=result)
            try:
                record = record_for(spooled)
            except Exception as exc:
                self._calls.post(settle, exc)
                return None
            spooled_as.append(spooled)
            return record, functools.partial(submitted, spooled)

        self.spooler.submit(
            (processed.queue_id, envelope_address(sender), recipients, processed.message), on_disk
        )
        self._record_waits.add(wait)
        try:
            return await done
        finally:
            self._record_waits.discard(wait)

    def _submit_spooled_records(self, spooled: list[Any]) -> None:
        """In the spool writer's thread, after each batch: the log records of the batch's
        messages go to the store writer together, and so into one commit."""
        records: list[_SpooledRecord] = spooled
        futures = self._writer.submit_many([record for record, _ in records])
        for (_, submitted), future in zip(records, futures, strict=True):
            submitted(future)

    async def _watch_record_waits(self) -> None:
        while True:
            await asyncio.sleep(min(RECORD_TIMEOUT_CHECK, RECORD_TIMEOUT / 4))
            self.expire_record_waits()

    def expire_record_waits(self, now: float | None = None) -> None:
        """Give up the waits for records submitted longer than ``RECORD_TIMEOUT`` ago: a
        record the store writer has not taken up yet is dropped, and the waiter answered."""
        now = time.monotonic() if now is None else now
        for wait in list(self._record_waits):
            future = wait.future
            if future is not None and now - wait.submitted_at >= RECORD_TIMEOUT:
                self._record_waits.discard(wait)
                future.cancel()  # not written if the writer has not taken it up yet
                wait.expire()

    async def record(self, record: MailRecord) -> int | None:
        """Write a record through the writer thread; durable when this returns.

        Gives up after ``RECORD_TIMEOUT`` (a store locked far longer than any purge batch;
        give or take ``RECORD_TIMEOUT_CHECK``) with ``TimeoutError``: a record not yet taken
        up by the writer is then dropped, so a quarantine answered 451 is not kept either.
        """
        future = self._writer.submit(record)
        waiter = self._calls.future(future)

        def expire() -> None:  # on the loop
            if not waiter.done():
                waiter.set_exception(TimeoutError("the message store writer did not answer"))

        wait = _RecordWait(expire, future, time.monotonic())
        self._record_waits.add(wait)
        try:
            result: int | None = await waiter
        finally:
            self._record_waits.discard(wait)
        return result

    async def record_quietly(self, record: MailRecord) -> None:
        """Write a log record whose loss must not change the answer (the mail is already safe
        or refused): a failure is reported, not raised."""
        try:
            await self.record(record)
        except Exception:  # TimeoutError included
            log.exception("the SMTP and tracking log rows of %s were not written", record.sender)

    def event(
        self,
        message: str,
        severity: Severity,
        details: dict[str, object],
        category: Category = Category.SMTP,
    ) -> None:
        """Write an event from a thread of its own (the ORM must not run on the event loop)."""
        self._event_pool.submit(_write_event, message, severity, details, category)

    async def event_async(
        self, message: str, severity: Severity, details: dict[str, object]
    ) -> None:
        await asyncio.wrap_future(self._event_pool.submit(_write_event, message, severity, details))


def _recipients_text(recipients: tuple[str, ...]) -> str:
    """The recipients an event message names: the first, and how many more."""
    if not recipients:
        return "no recipient"
    more = f" and {len(recipients) - 1} more" if len(recipients) > 1 else ""
    return f"{recipients[0]}{more}"


def _write_event(
    message: str,
    severity: Severity,
    details: dict[str, object],
    category: Category = Category.SMTP,
) -> None:
    from events.services import event_write

    try:
        event_write(category=category, message=message, severity=severity, details=details)
    except Exception:
        log.exception("event not written: %s", message)


def _close_database_connections() -> None:
    from django.db import connections

    connections.close_all()


def serve(
    host: str,
    port: int,
    root: Path | None = None,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Run the service in this process until SIGTERM or SIGINT (``manage.py smtp_service``)."""
    # aiosmtpd logs every command at INFO; per message that is noise, and slow.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # The event loop shares the GIL with the threads that parse and spool messages; with the
    # default 5 ms switch interval a busy thread keeps replies that are ready waiting that long
    # (measured: p95 acceptance latency 10 ms at 5 ms, 8 ms at 1 ms, one client).
    sys.setswitchinterval(0.001)
    # What is loaded by now (Django, the apps, the policy engine) lives as long as the process:
    # kept out of the garbage collector's full passes, which otherwise walk all of it (measured:
    # 66 ms each, every 1,500 messages or so, stalling every transaction in flight: the p99).
    gc.freeze()
    service = MailService(host, port, root=root)
    try:
        asyncio.run(service.serve_until_signalled(on_ready))
    finally:
        service.close()
