"""PhaseContext.at_low_priority: phase 2's online conversion in a thread of its own, niced, with
its progress and its stop question answered by the phase's own thread (and connection)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from appliance.mail.msgchunks import MigrateProgress
from appliance.system.priority import ONLINE_WORK_NICENESS
from jobs.engine import Lease
from tests.upgrades.test_install_views import make_run
from upgrades.models import InstallPhase, InstallRun, InstallState
from upgrades.phase_context import PhaseContext

pytestmark = pytest.mark.django_db


def _phase_2() -> PhaseContext:
    run = make_run(InstallState.RUNNING, 2)
    return PhaseContext(run, 2, Lease(job_id=0, owner="test", fence=1, kind="install",
                                      lease_seconds=60))  # fmt: skip


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_work_runs_niced_in_its_own_thread_and_its_progress_is_written_here() -> None:
    ctx = _phase_2()
    caller = _niceness()
    seen: dict[str, object] = {}

    def work(progress, should_stop) -> str:
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        seen["niceness"] = _niceness()
        progress(MigrateProgress("copy", 5, 10))  # queued: written before the end is seen
        return "converted"

    assert ctx.at_low_priority(work, unit="messages", message="copying") == "converted"
    assert seen == {"thread": True, "niceness": min(caller + ONLINE_WORK_NICENESS, 19)}
    assert _niceness() == caller  # the phases after it keep the worker's priority
    phase = InstallPhase.objects.get(run=ctx.run, number=2)
    assert (phase.done, phase.total, phase.unit) == (5, 10, "messages")
    assert phase.message == "copying: copy"


def test_an_abort_reaches_the_work_and_its_exception_reaches_the_phase() -> None:
    ctx = _phase_2()
    InstallRun.objects.filter(pk=ctx.run.pk).update(abort_requested=True)

    def work(progress, should_stop) -> None:
        deadline = time.monotonic() + 10
        while not should_stop():
            assert time.monotonic() < deadline, "the abort never reached the work"
            time.sleep(0.01)
        raise RuntimeError("stopped as asked")

    with pytest.raises(RuntimeError, match="stopped as asked"):
        ctx.at_low_priority(work, unit="messages", message="copying")
