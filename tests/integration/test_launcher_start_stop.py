"""`make run`'s launcher starts and stops like a service.

It says "LMI is serving" only once /healthz answers; a SIGTERM stops every child in order and
quietly; a launcher killed outright takes its children with it. Real processes throughout (see
tests/support/launcher.py).
"""

from __future__ import annotations

import os
import signal
import urllib.request

import psutil
import pytest

from tests.support.launcher import (  # noqa: F401
    WORKER_HOSTNAME,
    LauncherProcess,
    kill_leftovers,
    launcher,
)
from tests.support.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.engine_neutral]

SERVING = "LMI is serving"
ORPHAN_TIMEOUT = 10.0  # PR_SET_PDEATHSIG acts at once; gunicorn's workers notice within 1 s


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_it_says_serving_once_healthz_answers_and_stops_quietly_in_order_on_sigterm(
    launcher: LauncherProcess,  # noqa: F811
):
    wait_for(lambda: SERVING in launcher.log(), message=f"no banner:\n{launcher.tail()}")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
    with direct.open(f"http://127.0.0.1:{launcher.port}/healthz", timeout=5) as reply:
        assert reply.status == 200
    log = launcher.log()
    # /healthz pings the worker, which answers only once it is ready: the banner comes after.
    assert log.index(f"{WORKER_HOSTNAME} ready.") < log.index(SERVING)
    assert f"http://127.0.0.1:{launcher.port}/" in log[log.index(SERVING) :].splitlines()[0]

    processes = launcher.processes()
    assert len(processes) >= 8  # the launcher, Redis, gunicorn and a worker, celery + pool, ...
    # To the launcher's whole process group, as `kill -TERM -PGID` would: its children are in
    # sessions of their own, so it alone is told, and it stops them in order.
    assert launcher.process is not None
    os.killpg(launcher.process.pid, signal.SIGTERM)
    assert launcher.process.wait(timeout=30) == 0

    # SIGKILL to what a child left in its group takes effect a moment after it is sent.
    wait_for(lambda: all(_gone(process) for process in processes), timeout=5)
    log = launcher.log()
    assert "Traceback" not in log
    assert log.count("LMI stopped.") == 1
    assert log.rstrip().endswith("LMI stopped.")
    # The web server and the SMTP service were gone before the worker was asked to stop.
    warm = log.index("worker: Warm shutdown")
    assert log.index("Shutting down: Master") < warm
    assert log.index("SMTP service stopped") < warm


def test_children_die_with_a_launcher_killed_outright(launcher: LauncherProcess):  # noqa: F811
    processes = launcher.processes()
    children = set(launcher.children())
    assert children == {"redis", "web", "worker", "beat", "smtp"}
    commands = [" ".join(process.cmdline()[:4]) for process in processes]
    assert launcher.process is not None

    launcher.process.kill()
    launcher.process.wait(timeout=5)
    try:
        wait_for(
            lambda: all(_gone(process) for process in processes),
            timeout=ORPHAN_TIMEOUT,
            message=f"some of these outlived the launcher: {commands}",
        )
    finally:
        kill_leftovers(processes)  # the fixture cannot find them once the launcher is gone
    assert not launcher.redis_answers()
    assert not launcher.smtp_answers()
