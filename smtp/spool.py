"""The outgoing spool: where a message the policy lets through waits for delivery.

A message is in the spool (``var/spool/mailsec/outgoing``) before its sender is answered 250:
written to a temporary file, fsynced, renamed to its final name and the directory fsynced
(:func:`spool_write`; writes renamed at the same time share that last fsync, see
:class:`DirectorySync`). The mail service writes through one :class:`SpoolWriter` thread, which
writes the messages that arrived together as one batch behind one directory fsync
(:func:`spool_write_many`): a group commit, as the message store writer does for its rows. From
then on only delivery (:mod:`smtp.delivery`) removes it. One process at a time owns the spool
(:func:`spool_lock`); on start it sweeps what a crash left half-written (:func:`spool_clean`).

A spool file is the message as it will be delivered, led by its envelope in three kinds of
header lines the service writes and strips again before sending it on::

    X-LMI-Queue-ID: 1A2B3C4D5E
    Return-Path: <sender@example.net>
    X-LMI-Envelope-To: <first@example.com>
    X-LMI-Envelope-To: <second@example.com>
    Received: from ... (the service's own trace header, always next)
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from appliance.system.atomic import fsync_dir
from appliance.system.paths import layout

log = logging.getLogger("lmi.smtp.spool")

SPOOL_SUFFIX = ".eml"
SPOOL_FILE_MODE = 0o640
_QUEUE_ID = b"X-LMI-Queue-ID: "
_SENDER = b"Return-Path: "
_RECIPIENT = b"X-LMI-Envelope-To: "


T = TypeVar("T")


def queue_take_batch(
    source: queue.SimpleQueue[T | list[T] | None], first: T | list[T], limit: int
) -> tuple[list[T], bool]:
    """``first`` and what else already waits in ``source``, up to ``limit`` items, never
    waiting for more (a list on the queue counts as its items); and whether the stop mark,
    ``None``, was met. The mail service's writer threads (the spool writer and the store
    writer) take their work this way, so what arrived together shares one fsync or commit."""
    batch: list[T] = list(first) if isinstance(first, list) else [first]
    while len(batch) < limit:
        try:
            more = source.get_nowait()
        except queue.Empty:
            return batch, False
        if more is None:
            return batch, True
        if isinstance(more, list):
            batch.extend(more)
        else:
            batch.append(more)
    return batch, False


class SpoolLocked(RuntimeError):
    """Another mail service already delivers this appliance's spool."""


@dataclass(frozen=True)
class SpooledMessage:
    """A message in the spool: its envelope and the bytes to send to the next hop."""

    path: Path
    queue_id: str
    sender: str  # "" for the null sender (bounces)
    recipients: tuple[str, ...]
    message: bytes


def render_spool_file(
    queue_id: str, sender: str, recipients: tuple[str, ...], message: bytes
) -> bytes:
    """The spool file's bytes: the envelope lines, then the message."""
    if not recipients:
        raise ValueError("a spooled message needs at least one recipient")
    for value in (queue_id, sender, *recipients):
        if "\r" in value or "\n" in value:
            raise ValueError(f"envelope value with a line break: {value!r}")
    lines = [_QUEUE_ID + queue_id.encode("ascii"), _SENDER + f"<{sender}>".encode()]
    lines += [_RECIPIENT + f"<{recipient}>".encode() for recipient in recipients]
    return b"\r\n".join(lines) + b"\r\n" + message


def parse_spool_file(path: Path, data: bytes) -> SpooledMessage:
    """Split a spool file into its envelope and message; ``ValueError`` when it is not one."""
    position = 0
    queue_id = sender = None
    recipients: list[str] = []
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            raise ValueError(f"{path.name}: the envelope does not end")
        line = data[position:end]
        if line.startswith(_QUEUE_ID) and queue_id is None and position == 0:
            queue_id = line[len(_QUEUE_ID) :].decode("ascii")
        elif line.startswith(_SENDER) and sender is None:
            sender = line[len(_SENDER) :].decode().removeprefix("<").removesuffix(">")
        elif line.startswith(_RECIPIENT):
            recipients.append(line[len(_RECIPIENT) :].decode().removeprefix("<").removesuffix(">"))
        else:
            break
        position = end + 2
    if queue_id is None or sender is None or not recipients:
        raise ValueError(f"{path.name}: incomplete envelope")
    return SpooledMessage(path, queue_id, sender, tuple(recipients), data[position:])


class DirectorySync:
    """Group commit for a directory's entries: one ``fsync`` covers every rename before it.

    A spool write is durable once the directory holding its new name is fsynced. Writers that
    finished their renames at about the same time need not each pay for a directory fsync
    (a journal commit): :meth:`sync` waits for an fsync that *started after* the caller's rename
    (the one in progress may have started before it, so it does not count), and one caller runs
    it for everyone waiting. When that fsync fails, each waiter it was to cover runs its own
    (and raises its own error), so nobody is told "durable" on someone else's failure.
    Thread-safe; one instance per directory (:func:`directory_sync`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fsyncs = 0  # how many fsyncs ran (one per group): tests and benches read it
        self._condition = threading.Condition()
        self._requested = 0  # tickets handed out, one per sync() call
        self._synced = 0  # every ticket up to this one is covered by a finished fsync
        self._running = False

    def sync(self) -> None:
        """Return once an fsync of the directory that began after this call has returned."""
        with self._condition:
            self._requested += 1
            ticket = self._requested
            while self._running:
                self._condition.wait()
                if self._synced >= ticket:
                    return
            self._running = True
            covered = self._requested  # every rename up to here happened before the fsync
        try:
            fsync_dir(self.directory)
        except BaseException:
            with self._condition:
                self._running = False
                self._condition.notify_all()
            raise
        with self._condition:
            self.fsyncs += 1
            self._synced = covered
            self._running = False
            self._condition.notify_all()


_directory_syncs: dict[Path, DirectorySync] = {}


_directory_syncs_lock = threading.Lock()


def directory_sync(directory: Path) -> DirectorySync:
    """The process's one :class:`DirectorySync` of ``directory``."""
    with _directory_syncs_lock:
        found = _directory_syncs.get(directory)
        if found is None:
            found = _directory_syncs[directory] = DirectorySync(directory)
        return found


# An empty file made ahead in the spool directory, open for writing, and its name there.
SpareFile = tuple[int, Path]


def _new_temporary(temporary: Path) -> int:
    """An empty file of the spool's mode under ``temporary``, open for writing."""
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SPOOL_FILE_MODE)
    try:
        os.fchmod(fd, SPOOL_FILE_MODE)  # exactly, whatever the umask
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return fd


def _write_new_file(path: Path, data: bytes, spare: SpareFile | None = None) -> None:
    """``data`` under ``path`` (a name nobody else uses), on disk but for the directory entry:
    a temporary name beside it (``.<name>.tmp``, which :func:`spool_clean` sweeps, or the
    ``spare`` file made ahead), write, fsync, rename. The caller makes the rename durable with
    the directory's fsync."""
    if spare is None:
        temporary = path.with_name(f".{path.name}.tmp")
        fd = _new_temporary(temporary)
    else:
        fd, temporary = spare
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# A message to spool: (queue id, sender, recipients, the message as it will be delivered).
SpoolEntry = tuple[str, str, tuple[str, ...], bytes]


# Where a spooled message went: its path, or why it is not in the spool.
SpoolResult = Path | Exception


def spool_write(
    queue_id: str,
    sender: str,
    recipients: tuple[str, ...],
    message: bytes,
    root: Path | None = None,
) -> Path:
    """Put a message in the spool durably (on disk, under its final name) and return its path.

    Written to a temporary file, fsynced, renamed, and the directory fsynced before this returns,
    as :func:`appliance.system.atomic.atomic_write_bytes` does; the directory's fsync is shared
    with the writes renamed at the same time (:class:`DirectorySync`), so concurrent clients
    pay for one journal commit between them instead of one each. Raises ``OSError`` when the
    message is not in the spool (nothing of it is left there then), ``ValueError`` for an
    envelope value with a line break.

    The name starts with the time in nanoseconds, so the spool sorts in arrival order.
    """
    (result,) = spool_write_many([(queue_id, sender, recipients, message)], root)
    if isinstance(result, Exception):
        raise result
    return result


def spool_write_many(
    entries: list[SpoolEntry], root: Path | None = None, spares: list[SpareFile] | None = None
) -> list[SpoolResult]:
    """Put several messages in the spool durably, all behind one fsync of the directory.

    Returns, for each entry, its path or why it is not in the spool. Each file is written as
    :func:`spool_write` writes one (a temporary file, fsynced, renamed); then one directory
    fsync covers all the renames (shared, as ever, with the other writers of the moment:
    :class:`DirectorySync`). A message whose own write failed fails alone, without a temporary
    file left behind. When the directory fsync fails, no rename of the batch is known to be on
    disk: every message of the batch fails with that error, and its file is taken out of the
    spool again, so that none is delivered after its sender was told to send it again.

    ``spares`` are empty files made ahead in the spool directory (see :class:`SpoolWriter`):
    entries are written into them, as many as there are, each taken off the list.
    """
    directory = layout(root).mail_spool_dir
    results: list[SpoolResult] = []
    renamed: list[tuple[int, Path]] = []
    for queue_id, sender, recipients, message in entries:
        path = directory / f"{time.time_ns():020d}-{queue_id}{SPOOL_SUFFIX}"
        try:
            data = render_spool_file(queue_id, sender, recipients, message)
            spare = spares.pop() if spares else None
            try:
                _write_new_file(path, data, spare)
            except FileNotFoundError:  # no spool yet (a new appliance), or the spare is gone
                directory.mkdir(parents=True, exist_ok=True)
                _write_new_file(path, data)
        except (OSError, ValueError) as exc:
            results.append(exc)
        else:
            renamed.append((len(results), path))
            results.append(path)
    if renamed:
        try:
            directory_sync(directory).sync()
        except OSError as exc:
            for index, path in renamed:
                with contextlib.suppress(OSError):
                    path.unlink()
                results[index] = exc
    return results


# Called in the spool writer's thread with where the message went (it must not block); what it
# returns, when not None, goes to the writer's ``after_batch`` with the rest of the batch's.
SpoolDone = Callable[[SpoolResult], object]


class SpoolWriter:
    """The mail service's one thread writing the spool: a group commit of spool files.

    Messages that wait while a batch is written go in the next batch together
    (:func:`spool_write_many`): one directory fsync, one wake-up of this thread and one of
    whoever waits for the batch cover all of them. A thread per message paid for each of its
    own, and took the GIL back from the event loop at every system call, which is what
    limited the rate of the accept path. (Two writer threads were measured no faster on a
    shared disk: their fsyncs queue behind each other.)

    While no message waits, the thread makes up to ``spares`` empty files ahead (dot-named
    ``.tmp`` files, which :func:`spool_clean` sweeps should the service die), and the next
    messages are written into those: making a file (its inode) is the dearest step of a spool
    write on some filesystems (0.3-0.9 ms of kernel time measured on ext4 without a journal),
    and this way it happens while the clients are still sending, not while they wait for
    their 250. Each message still takes one new file, so the disk work is the same.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        max_batch: int = 64,
        spares: int = 8,
        after_batch: Callable[[list[object]], None] | None = None,
    ) -> None:
        self._root = root
        self._max_batch = max_batch
        self._spare_target = spares
        self._spares: list[SpareFile] = []  # in this thread only
        self._spare_numbers = itertools.count()
        self._after_batch = after_batch
        self._queue: queue.SimpleQueue[tuple[SpoolEntry, SpoolDone] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self.batches = 0  # how many batches were written: tests and benches read it

    @property
    def waiting(self) -> int:
        """Messages submitted and not yet taken up into a batch (tests and benches read it)."""
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    def submit(self, entry: SpoolEntry, done: SpoolDone) -> None:
        """Spool ``entry`` with the next batch; ``done`` is called with where it went."""
        self._queue.put((entry, done))

    def close(self) -> None:
        """Write what is queued, then stop (and remove the spare files)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for fd, temporary in self._spares:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self._spares.clear()

    def _make_spare(self) -> bool:
        """Make one spare file; False when it could not be made (tried again after a batch)."""
        try:
            name = f".spare-{os.getpid()}-{next(self._spare_numbers)}.tmp"
            temporary = layout(self._root).mail_spool_dir / name
            self._spares.append((_new_temporary(temporary), temporary))
        except FileNotFoundError:  # no spool yet: the first message makes it
            return False
        except Exception:  # a spare is only a head start: the messages make their own files
            log.warning("no spare spool file could be made", exc_info=True)
            return False
        return True

    def _run(self) -> None:
        may_make_spares = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                # Nothing to write: make a spare file, then look again (a message that came
                # meanwhile waits one file's making at most).
                if may_make_spares and len(self._spares) < self._spare_target:
                    may_make_spares = self._make_spare()
                    continue
                item = self._queue.get()
            if item is None:
                return
            may_make_spares = True
            batch, stop = queue_take_batch(self._queue, item, self._max_batch)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list[tuple[SpoolEntry, SpoolDone]]) -> None:
        try:
            results = spool_write_many([entry for entry, _ in batch], self._root, self._spares)
        except Exception as exc:  # unforeseen: none of the batch is known to be spooled
            log.exception("a batch of spool writes failed")
            results = [exc] * len(batch)
        self.batches += 1
        follow_ups: list[object] = []
        for (_, done), result in zip(batch, results, strict=True):
            try:
                follow_up = done(result)
            except Exception:
                log.exception("the spool writer's callback failed")
            else:
                if follow_up is not None:
                    follow_ups.append(follow_up)
        if follow_ups and self._after_batch is not None:
            try:
                self._after_batch(follow_ups)
            except Exception:
                log.exception("the spool writer's batch callback failed")


def spool_find(queue_id: str, root: Path | None = None) -> Path | None:
    """The spool file of this queue id, None when it is not (or no longer) in the spool."""
    directory = layout(root).mail_spool_dir
    if not directory.is_dir():
        return None
    return next(iter(sorted(directory.glob(f"*-{queue_id}{SPOOL_SUFFIX}"))), None)


def spool_list(root: Path | None = None) -> list[Path]:
    """The messages waiting in the spool, oldest first."""
    directory = layout(root).mail_spool_dir
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.iterdir()
        if path.name.endswith(SPOOL_SUFFIX) and not path.name.startswith(".")
    )


def spool_clean(root: Path | None = None) -> int:
    """Remove temp files of writes a crash interrupted (never answered 250); return how many."""
    directory = layout(root).mail_spool_dir
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        fsync_dir(directory)
    return removed


def spool_lock(root: Path | None = None) -> int:
    """Lock the spool for this process (released by the kernel when it exits, even killed).

    Two services delivering one spool would send messages twice. Returns the descriptor to
    keep open; raises :class:`SpoolLocked` when another process holds the lock.
    """
    directory = layout(root).mail_spool_dir
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise SpoolLocked(f"another mail service is delivering {directory}") from exc
    return fd
