"""`make run`'s launcher keeps the console up when one of its processes dies.

Real processes throughout: the launcher with its private Redis, gunicorn, the Celery worker and
beat and the SMTP service, on free ports and the test database. Children are killed with
SIGKILL, as a crash or the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import smtplib

import psutil
import pytest

from events.models import Category, Event, Severity
from tests.support.launcher import LauncherProcess, launcher  # noqa: F401
from tests.support.mailload import SmtpSessions
from tests.support.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.engine_neutral]

RECOVERY_TIMEOUT = 30.0
# A queue no worker consumes: what is queued there must still be there after a Redis restart.
PARKED_QUEUE = "lmi.parked-by-test"


class SmtpProbe(SmtpSessions):
    """Holds SMTP sessions (connect, EHLO, NOOP, QUIT) one after another; keeps every failure."""

    session_timeout = 5.0
    stop_timeout = 10.0

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sessions = 0
        self.failures: list[str] = []

    def session(self) -> None:
        try:
            with self.connect() as client:
                ehlo, noop = client.ehlo()[0], client.noop()[0]
            if (ehlo, noop) != (250, 250):
                self.failures.append(f"EHLO {ehlo}, NOOP {noop}")
            self.sessions += 1
        except (OSError, smtplib.SMTPException) as exc:
            self.failures.append(repr(exc))


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _replaced(running: LauncherProcess, old: dict[str, int], *names: str) -> dict[str, int]:
    """The launcher's children once each named one runs again under a new pid, else {}."""
    children = running.children()
    if all(children.get(name) not in (None, old[name]) for name in names):
        return children
    return {}


def _a_task_runs(running: LauncherProcess, message: str) -> None:
    """The worker takes a task from the launcher's Redis and runs it (a reconcile pass)."""
    task = running.send_task("jobs.reconcile")
    wait_for(lambda: running.task_succeeded(task), timeout=RECOVERY_TIMEOUT, message=message)


def test_a_killed_redis_is_restarted_and_the_worker_and_smtp_service_carry_on(
    launcher: LauncherProcess,  # noqa: F811
):
    before = launcher.children()
    assert set(before) == {"redis", "web", "worker", "beat", "smtp"}
    # A delayed task the worker holds unacknowledged (the kombu path that used to make the
    # worker exit when the broker went away), and a task queued where nobody consumes it.
    held = launcher.send_task("jobs.reconcile", countdown=600)
    launcher.send_task("jobs.reconcile", queue=PARKED_QUEUE)
    wait_for(
        lambda: f"[{held}] received" in launcher.log(),
        message=f"the worker did not take the delayed task:\n{launcher.tail()}",
    )
    probe = SmtpProbe(launcher.smtp_port)
    probe.start()
    try:
        wait_for(lambda: probe.sessions > 0, message=f"no SMTP session: {probe.failures}")

        os.kill(before["redis"], signal.SIGKILL)

        wait_for(
            lambda: _replaced(launcher, before, "redis") and launcher.redis_answers(),
            timeout=RECOVERY_TIMEOUT,
            message=f"Redis was not restarted:\n{launcher.tail()}",
        )
        _a_task_runs(launcher, f"the worker ran no task after the restart:\n{launcher.tail()}")
    finally:
        probe.stop()

    assert probe.failures == []
    assert launcher.running()
    children = launcher.children()
    # The worker rode out the broker restart in the same process; nothing else was touched.
    assert "Unrecoverable error" not in launcher.log()
    for name in ("web", "worker", "beat", "smtp"):
        assert children[name] == before[name], name
    # The append-only file gave the restarted server its queue back, and the unacknowledged
    # delayed task (redelivered once its visibility timeout has passed).
    assert launcher.redis().llen(PARKED_QUEUE) == 1
    assert launcher.redis().hlen("unacked") >= 1
    event = Event.objects.get(category=Category.SYSTEM, details__process="redis")
    assert event.severity == Severity.WARNING
    assert event.message == "The private Redis was killed by SIGKILL; restarting it in 1 s"
    assert event.username == "launcher"


def test_a_killed_worker_and_beat_are_restarted_with_a_growing_delay_until_sigterm(
    launcher: LauncherProcess,  # noqa: F811
):
    first = launcher.children()
    pool = psutil.Process(first["worker"]).children()
    assert pool, "the worker has no pool processes"

    os.kill(first["worker"], signal.SIGKILL)
    os.kill(first["beat"], signal.SIGKILL)
    second = wait_for(
        lambda: launcher.workers_ready() >= 2 and _replaced(launcher, first, "worker", "beat"),
        timeout=RECOVERY_TIMEOUT,
        message=f"the worker or beat was not restarted:\n{launcher.tail()}",
    )
    # The dead worker's pool went with it instead of lingering as orphans.
    wait_for(lambda: all(_gone(process) for process in pool), message="the old pool lingers")

    # Dead again within a minute of its start: the second restart waits twice as long.
    os.kill(second["worker"], signal.SIGKILL)
    wait_for(
        lambda: launcher.workers_ready() >= 3 and _replaced(launcher, second, "worker"),
        timeout=RECOVERY_TIMEOUT,
        message=f"the worker was not restarted a second time:\n{launcher.tail()}",
    )
    _a_task_runs(launcher, f"the restarted worker ran no task:\n{launcher.tail()}")
    assert launcher.running()
    # Nothing else stopped with them: the SMTP service took no notice.
    third = launcher.children()
    assert [third[name] for name in ("redis", "web", "smtp")] == [
        first[name] for name in ("redis", "web", "smtp")
    ]
    assert launcher.smtp_answers()
    assert sorted(
        Event.objects.filter(category=Category.SYSTEM, username="launcher").values_list(
            "message", flat=True
        )
    ) == [
        "The Celery beat was killed by SIGKILL; restarting it in 1 s",
        "The Celery worker was killed by SIGKILL; restarting it in 1 s",
        "The Celery worker was killed by SIGKILL; restarting it in 2 s",
    ]

    # SIGTERM (Ctrl-C alike) still stops everything, cleanly.
    processes = launcher.processes()
    assert launcher.stop() == 0
    assert all(_gone(process) for process in processes)
    assert launcher.log().rstrip().endswith("LMI stopped.")
