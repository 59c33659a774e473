"""Celery interface to Backup & Restore: fetch by id, call the service, return.

``scheduled_backup`` is the hourly beat entry (lmi/settings.py); it acts once a day.
``system_backup_run`` runs one system backup job; a second delivery finds the job claimed and
does nothing. A worker that starts fails the jobs it (by its node name) or a silent worker was
running, and enqueues queued ones again, so a killed worker never leaves a job "running".
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from backups import services

logger = logging.getLogger(__name__)

# Writing or restoring a large image on a slow disk takes a while; one job at a time anyway.
SYSTEM_SOFT_TIME_LIMIT = 2 * 3600
SYSTEM_TIME_LIMIT = SYSTEM_SOFT_TIME_LIMIT + 120


@shared_task(name="backups.tasks.scheduled_backup", ignore_result=True)
def scheduled_backup() -> str | None:
    """Beat, hourly: the daily configuration backup when its hour has come."""
    header = services.scheduled_backup_run()
    return header.name if header is not None else None


@shared_task(
    bind=True,
    name="backups.tasks.system_backup_run",
    ignore_result=True,
    soft_time_limit=SYSTEM_SOFT_TIME_LIMIT,
    time_limit=SYSTEM_TIME_LIMIT,
)
def system_backup_run(self: Any, job_id: int) -> None:
    """Create or restore the system backup image for one job."""
    services.system_backup_execute(job_id, executor=self.request.hostname or "")


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Start again the jobs the previous run of this worker left running; enqueue queued ones
    again."""
    try:
        hostname = getattr(sender, "hostname", None)
        reaped = services.system_jobs_reap(executor=hostname)
        if reaped:
            logger.info("started again %s system backup jobs whose worker stopped", reaped)
        services.system_jobs_requeue()
    except Exception:  # never keep a worker from starting
        logger.exception("could not recover system backup jobs at start-up")
