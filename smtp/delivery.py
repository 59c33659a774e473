"""Delivery of the outgoing spool (:mod:`smtp.spool`) to the next hop, or to the local sink.

Delivery alone takes a message out of the spool: after the next hop has answered 250 for it,
or by an atomic rename into the sink (``var/spool/mailsec/delivered``) when no next hop is
configured. On start the service delivers whatever a stop or a crash left in the spool; a
failed attempt is retried with exponential backoff for as long as it takes (this service does
not bounce). A file in the sink keeps the spool file's envelope lines, as a local delivery
records its envelope.

Delivery to a next hop is at least once: a crash between the next hop's 250 and the removal of
the spool file sends that message again on restart. Delivery to the sink is exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import smtplib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from appliance.config.store import read_smtp_settings
from appliance.system.atomic import atomic_write_bytes, fsync_dir
from appliance.system.errors import ApplianceError
from appliance.system.paths import layout
from events.models import Severity
from smtp.spool import (
    SPOOL_FILE_MODE,
    directory_sync,
    parse_spool_file,
    render_spool_file,
    spool_clean,
    spool_list,
)

log = logging.getLogger("lmi.smtp.delivery")
NEXT_HOP_TIMEOUT = 30.0
DEFAULT_NEXT_HOP_PORT = 25


# How long a delivery attempt waits for more messages to join it while mail is flowing (see
# DeliveryQueue._work). With bench/smtp_accept.py (two runs each, alternating) 0.1 s rather than
# 0.02 s accepted 619-677 rather than 590-621 msg/s with 4 clients and 834-1,024 rather than
# 802-834 with 16: fewer directory fsyncs of the sink, competing with the spool writer's.
DELIVERY_LINGER = 0.1


class DeliveryError(Exception):
    """The next hop did not take the message (yet); it stays in the spool for a retry."""


def parse_next_hop(text: str) -> tuple[str, int] | None:
    """``host``, ``host:port`` or ``[v6-address]:port`` as (host, port); None when empty."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_NEXT_HOP_PORT
    except ValueError as exc:
        raise DeliveryError(f"next hop {text!r}: port is not a number") from exc
    if not host or not 1 <= port <= 65535:
        raise DeliveryError(f"next hop {text!r} is not host:port")
    return host, port


def _to_sink(paths: list[Path], root: Path | None) -> list[str | BaseException]:
    """Rename each file into the sink, then make all the renames durable with one fsync each
    of the two directories (a rename lost to a power cut leaves the file in the spool, to be
    delivered again; it is never in both places, never in neither)."""
    sink = layout(root).mail_sink_dir
    sink.mkdir(parents=True, exist_ok=True)
    results: list[str | BaseException] = []
    for path in paths:
        try:
            os.replace(path, sink / path.name)
        except OSError as exc:
            results.append(exc)
        else:
            results.append("local sink")
    if any(isinstance(result, str) for result in results):
        fsync_dir(sink)
        for directory in {path.parent for path in paths}:
            directory_sync(directory).sync()  # shared with the spool writes of the moment
    return results


def _send_one(client: smtplib.SMTP, path: Path, where: str) -> str:
    spooled = parse_spool_file(path, path.read_bytes())
    options = []
    if client.has_extn("8bitmime") and any(byte > 127 for byte in spooled.message):
        options.append("BODY=8BITMIME")
    try:
        refused = client.sendmail(
            spooled.sender, list(spooled.recipients), spooled.message, options
        )
    except smtplib.SMTPRecipientsRefused as exc:
        raise DeliveryError(f"{where} refused every recipient: {exc.recipients}") from exc
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
        raise DeliveryError(f"{where} refused the message: {exc}") from exc
    if refused:
        remaining = tuple(r for r in spooled.recipients if r in refused)
        atomic_write_bytes(
            path,
            render_spool_file(spooled.queue_id, spooled.sender, remaining, spooled.message),
            SPOOL_FILE_MODE,
        )
        raise DeliveryError(f"{where} refused {len(remaining)} recipient(s): {refused}")
    path.unlink()
    return where


def _to_next_hop(
    paths: list[Path], host: str, port: int, hostname: str
) -> list[str | BaseException]:
    """Send the messages over one connection; each leaves the spool after its own 250."""
    where = f"{host}:{port}"
    results: list[str | BaseException] = []
    try:
        with smtplib.SMTP(host, port, local_hostname=hostname, timeout=NEXT_HOP_TIMEOUT) as client:
            client.ehlo_or_helo_if_needed()
            for path in paths:
                try:
                    results.append(_send_one(client, path, where))
                except (DeliveryError, FileNotFoundError, ValueError) as exc:
                    results.append(exc)
                    client.rset()
    except (smtplib.SMTPException, OSError) as exc:
        # The connection failed: this message and the ones after it are tried again later.
        error = DeliveryError(f"{where}: {exc}")
        results += [error] * (len(paths) - len(results))
    if any(isinstance(result, str) for result in results):
        directory_sync(paths[0].parent).sync()
    return results


_next_hop_cache: dict[Path, tuple[tuple[int, int, int], tuple[str, int] | None]] = {}


def _next_hop(root: Path | None) -> tuple[str, int] | None:
    """The configured next hop, read again only when the SMTP settings file changed (its
    mtime, size or inode): parsing the XML for every batch cost ~0.3 ms a message."""
    xml = layout(root).smtp_xml
    try:
        st = os.stat(xml)
    except FileNotFoundError:
        st = None
    signature = (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None
    cached = _next_hop_cache.get(xml)
    if signature is not None and cached is not None and cached[0] == signature:
        return cached[1]
    hop = parse_next_hop(read_smtp_settings(root).next_hop)
    if signature is not None:
        _next_hop_cache[xml] = (signature, hop)
    return hop


def deliver_batch(
    paths: list[Path], root: Path | None = None, hostname: str = "localhost"
) -> list[str | BaseException]:
    """Deliver spooled messages and take each out of the spool once delivered.

    Returns, per path, where it went or why not: :class:`DeliveryError` when the next hop
    refused it or could not be reached (for recipients it did take, the spool file is
    rewritten without them first, so a retry never sends them a second copy), and
    ``FileNotFoundError`` when it is no longer in the spool.
    """
    try:
        hop = _next_hop(root)
    except (ApplianceError, DeliveryError) as exc:
        return [exc] * len(paths)
    if hop is None:
        return _to_sink(paths, root)
    return _to_next_hop(paths, *hop, hostname)


def deliver(path: Path, root: Path | None = None, hostname: str = "localhost") -> str:
    """Deliver one spooled message (see :func:`deliver_batch`); raise why it was not."""
    (result,) = deliver_batch([path], root, hostname)
    if isinstance(result, BaseException):
        raise result
    return result


EventCallback = Callable[[str, Severity, dict[str, object]], None]


class DeliveryQueue:
    """Delivers spooled messages in the background, retrying failures with backoff.

    Runs on the service's event loop; each attempt runs in ``executor`` (it blocks on the
    disk and the network). What is pending lives in the spool directory, so this holds only
    what it needs to schedule: the messages queued, in flight or waiting for a retry.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        root: Path | None = None,
        hostname: str = "localhost",
        workers: int = 2,
        batch: int = 64,
        linger: float = DELIVERY_LINGER,
        retry_base: float = 1.0,
        retry_max: float = 600.0,
        on_event: EventCallback | None = None,
    ) -> None:
        self._executor = executor
        self._root = root
        self._hostname = hostname
        self._workers = workers
        self._batch = batch
        self._linger = linger
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._on_event = on_event
        self._queue: asyncio.Queue[Path] = asyncio.Queue()
        self._known: set[Path] = set()
        self._attempts: dict[Path, int] = {}
        self._timers: dict[Path, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_submitted = -math.inf  # time.monotonic() of the latest submit
        self._flowing = False  # the latest message came within ``linger`` of the one before
        self.delivered = 0

    @property
    def pending(self) -> int:
        """Messages queued, in flight or waiting for a retry."""
        return len(self._known)

    def start(self) -> int:
        """Start the workers and queue what is already in the spool; return how many that is."""
        spool_clean(self._root)
        waiting = spool_list(self._root)
        for path in waiting:
            self.submit(path)
        for number in range(self._workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"delivery-{number}"))
        return len(waiting)

    def submit(self, path: Path) -> None:
        if path not in self._known:
            now = time.monotonic()
            self._flowing = now - self._last_submitted < self._linger
            self._last_submitted = now
            self._known.add(path)
            self._queue.put_nowait(path)

    async def stop(self) -> None:
        """Stop delivering; an attempt in flight finishes in its thread, the rest stays spooled."""
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _event(self, message: str, severity: Severity, details: dict[str, object]) -> None:
        if self._on_event is not None:
            self._on_event(message, severity, details)

    def _retry(self, path: Path) -> None:
        self._timers.pop(path, None)
        self._queue.put_nowait(path)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Whatever is waiting goes in one attempt: one connection to the next hop, one
            # pair of directory fsyncs for the sink.
            batch = [await self._queue.get()]
            if self._linger and self._flowing and self._queue.qsize() < self._batch - 1:
                # Under steady mail a message arrives every few ms: waiting a moment lets
                # the next ones join this attempt, and its directory fsyncs (which the spool
                # writes would otherwise queue behind) are shared by all of them. A message
                # after a quiet spell goes at once: nothing is coming to join it.
                await asyncio.sleep(self._linger)
            while len(batch) < self._batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await loop.run_in_executor(
                    self._executor, deliver_batch, batch, self._root, self._hostname
                )
            except Exception as exc:  # a failure of the whole attempt (a full disk, say)
                results = [exc] * len(batch)
            for path, result in zip(batch, results, strict=True):
                if isinstance(result, FileNotFoundError):
                    self._done(path)  # no longer spooled: delivered already
                elif isinstance(result, BaseException):
                    self._failed(path, result)
                else:
                    self._delivered(path, result)

    def _delivered(self, path: Path, where: str) -> None:
        attempts = self._attempts.get(path, 0) + 1
        if attempts > 1:
            self._event(
                f"Delivered {path.name} to {where} after {attempts} attempts",
                Severity.INFO,
                {"file": path.name, "next_hop": where, "attempts": attempts},
            )
        self.delivered += 1
        self._done(path)

    def _done(self, path: Path) -> None:
        self._known.discard(path)
        self._attempts.pop(path, None)

    def _failed(self, path: Path, exc: BaseException) -> None:
        attempts = self._attempts.get(path, 0) + 1
        self._attempts[path] = attempts
        delay = min(self._retry_max, self._retry_base * 2 ** (attempts - 1))
        log.warning(
            "delivery of %s failed (attempt %d), retry in %.0f s: %s",
            path.name,
            attempts,
            delay,
            exc,
        )
        if attempts == 1:
            self._event(
                f"Delivery of {path.name} failed; it stays in the spool and is retried: {exc}",
                Severity.WARNING,
                {"file": path.name, "error": str(exc)},
            )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # the loop is closing: the file stays spooled
            self._timers[path] = loop.call_later(delay, self._retry, path)
