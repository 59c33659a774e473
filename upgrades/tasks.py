"""Celery interface to Updates & Licensing: fetch by id, call the service, return.

``update_check`` is the hourly beat entry (the name is the one lmi/settings.py schedules).
Downloads and installs run as jobs of the job engine (``jobs.run``; upgrades/downloader.py,
upgrades/install.py).

A worker that starts checks the feed when the last check is more than an hour old (or there
was none): beat's hourly entry first fires at the next :07, and a fresh `make run` should show
"Firmware 2.8.1.0 is available" at once. This is a one-off at start-up, not a task
rescheduling itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from upgrades import install, selectors, services
from upgrades.models import CheckTrigger

logger = logging.getLogger(__name__)


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


@shared_task(name="upgrades.tasks.install_schedule_due", ignore_result=True)
def install_schedule_due() -> int | None:
    """Beat, every minute (issue 18): start the scheduled install once its time has come."""
    from upgrades.schedule import schedule_due

    due = schedule_due()
    return due.pk if due is not None else None


@shared_task(name="upgrades.tasks.return_release_due", ignore_result=True)
def return_release_due() -> list[int]:
    """Beat, hourly (issue 18): release the way back of upgrades past their retention period."""
    from upgrades.returning import return_release_due as release

    return release()


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Check the feed if the last check is overdue (downloads and install runs a killed worker
    left are the job engine's reconciler's, which also runs at worker start)."""
    try:
        if selectors.check_overdue():
            update_check.delay()
    except Exception:  # never keep a worker from starting
        logger.exception("could not check for updates at start-up")
