"""Online work at low priority: long reads and copies that run while mail flows.

The install's phase 2 builds the converted message store while the mail service keeps
accepting, the validation report (phase 10) reads the old and the new store whole once mail
flows again, and a rehearsal copies a snapshot's store while the live appliance serves mail.
Each is paced already (``yield_ratio``: it rests a share of each block's time); running it at a
lower CPU priority as well lets the mail service's threads go first whenever both want a core
(measured in phase 2 at 200k messages: mail during phase 2 went from 87-88% to 91-94% of its
rate before the install).

Linux keeps a nice value per thread, so the work runs in a thread of its own that is niced and
ends with it: whatever runs after it in the calling thread (the downtime phases, say) keeps
the process's priority, which an unprivileged process could not take back once given up.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

ONLINE_WORK_NICENESS = 10
POLL_S = 0.5  # how often the calling thread asks ``should_stop`` while the work runs

T = TypeVar("T")
Work = Callable[[Callable[[Any], None], Callable[[], bool]], T]

_FINISHED = object()


def nice_this_thread(niceness: int = ONLINE_WORK_NICENESS) -> None:
    """Lower this thread's CPU priority by ``niceness`` (not Linux, or not allowed: as it is)."""
    with contextlib.suppress(OSError, AttributeError):
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + niceness)


def at_low_priority(
    work: Work[T],
    *,
    name: str,
    report: Callable[[Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll: float = POLL_S,
) -> T:
    """``work(progress, stop_asked)`` in a thread of its own at ONLINE_WORK_NICENESS.

    What ``work`` passes to ``progress`` reaches ``report`` in the calling thread, and the
    calling thread asks ``should_stop`` (every ``poll`` seconds) and answers ``stop_asked``
    from it: ``report`` and ``should_stop`` may use the calling thread's database connection,
    ``work`` must not use one. Returns what ``work`` returned, or raises what it raised; an
    exception raised here (by ``report`` or ``should_stop``) stops ``work`` first.
    """
    reports: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            nice_this_thread()
            outcome["value"] = work(reports.put, stop.is_set)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            reports.put(_FINISHED)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = reports.get(timeout=poll)
            except queue.Empty:
                item = None
            if item is _FINISHED:
                break
            if item is not None and report is not None:
                report(item)
            if should_stop is not None and should_stop():
                stop.set()
    finally:
        stop.set()  # a no-op once it ended; else it stops at its next question
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]
