"""appliance.system.priority: online work in a niced thread of its own, its progress and its
stop question answered by the calling thread."""

from __future__ import annotations

import os
import threading

import pytest

from appliance.system.priority import ONLINE_WORK_NICENESS, at_low_priority


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_work_runs_niced_elsewhere_and_the_caller_keeps_its_priority() -> None:
    caller, here = _niceness(), threading.get_ident()
    seen: dict[str, object] = {}
    reported: list[tuple[int, bool]] = []

    def work(progress, stop_asked) -> str:
        seen["elsewhere"] = threading.get_ident() != here
        seen["niceness"] = _niceness()
        progress(1)
        progress(2)
        return "done"

    def report(item: int) -> None:
        reported.append((item, threading.get_ident() == here))

    assert at_low_priority(work, name="test-online", report=report) == "done"
    assert seen == {"elsewhere": True, "niceness": min(caller + ONLINE_WORK_NICENESS, 19)}
    assert reported == [(1, True), (2, True)]
    assert _niceness() == caller


def test_the_callers_stop_reaches_the_work_and_its_error_comes_back() -> None:
    asked_in: list[bool] = []
    here = threading.get_ident()

    def should_stop() -> bool:
        asked_in.append(threading.get_ident() == here)
        return True

    def work(progress, stop_asked) -> None:
        while not stop_asked():
            threading.Event().wait(0.01)
        raise RuntimeError("stopped as asked")

    with pytest.raises(RuntimeError, match="stopped as asked"):
        at_low_priority(work, name="test-online", should_stop=should_stop, poll=0.01)
    assert asked_in and all(asked_in)
