"""Celery interface to Updates & Licensing: fetch by id, call the service, return.

``update_check`` is the hourly beat entry (the name is the one lmi/settings.py schedules).
``download_run`` runs one download; it is safe to deliver twice (acks_late redelivers it after a
killed worker) because the download's lease lets one executor through.

A worker that starts re-enqueues the active downloads, so a download whose worker was killed
resumes as soon as a worker is back, without waiting for the broker's visibility timeout. It
also checks the feed when the last check is more than an hour old (or there was none): beat's
hourly entry first fires at the next :07, and a fresh `make run` should show "Firmware 2.8.1.0
is available" at once. This is a one-off at start-up, not a task rescheduling itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from upgrades import install, selectors, services
from upgrades.models import CheckTrigger

logger = logging.getLogger(__name__)

# A bundle over a slow line can take hours; the lease (not the time limit) keeps one executor.
DOWNLOAD_SOFT_TIME_LIMIT = 6 * 3600
DOWNLOAD_TIME_LIMIT = DOWNLOAD_SOFT_TIME_LIMIT + 120


@shared_task(name="upgrades.tasks.update_check", ignore_result=True)
def update_check() -> bool:
    """Beat, hourly: check the feed (downloads and installs that lost their worker are the job
    engine's reconciler's, every few seconds).

    While an install holds maintenance the feed is left alone (an automatic download would
    compete with the upgrade for the spool's disk).
    """
    if install.install_holds_maintenance():
        return False
    return services.update_check(trigger=CheckTrigger.SCHEDULE).ok


@shared_task(
    name="upgrades.tasks.download_run",
    ignore_result=True,
    soft_time_limit=DOWNLOAD_SOFT_TIME_LIMIT,
    time_limit=DOWNLOAD_TIME_LIMIT,
)
def download_run(download_id: int) -> str:
    """Download, verify and publish one firmware bundle (or resume it)."""
    return services.download_execute(download_id, executor=services.executor_name("worker"))


# A phase's blocking work is bounded by the lease and its own steps, not by the time limit;
# the limits only stop a task that hangs for ever (the recovery then takes the run over).
INSTALL_SOFT_TIME_LIMIT = 6 * 3600
INSTALL_TIME_LIMIT = INSTALL_SOFT_TIME_LIMIT + 120


@shared_task(
    name="upgrades.tasks.install_phase",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=INSTALL_SOFT_TIME_LIMIT,
    time_limit=INSTALL_TIME_LIMIT,
)
def install_phase(run_id: int, phase: int) -> None:
    """Run one phase of a firmware install; a second copy finds the lease held and exits."""
    install.install_close_connections()
    install.install_execute(run_id, phase, install.executor_name("worker"))


@shared_task(
    name="upgrades.tasks.install_rollback",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=INSTALL_SOFT_TIME_LIMIT,
    time_limit=INSTALL_TIME_LIMIT,
)
def install_rollback(run_id: int) -> None:
    """Roll a failed install back to the exact pre-upgrade state (idempotent)."""
    install.install_close_connections()
    install.install_rollback_execute(run_id, install.executor_name("worker"))


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Resume every active download (one killed a moment ago still looks alive to the job
    engine's reconciler, which also resumes install runs at worker start); check the feed if
    the last check is overdue."""
    try:
        resumed = services.downloads_recover(stale_only=False)
        if resumed:
            logger.info("re-enqueued firmware downloads %s", resumed)
        if selectors.check_overdue():
            update_check.delay()
    except Exception:  # never keep a worker from starting
        logger.exception("could not resume downloads or check for updates at start-up")
