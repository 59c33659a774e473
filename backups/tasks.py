"""Celery interface to Backup & Restore: fetch by id, call the service, return.

``scheduled_backup`` is the hourly beat entry (lmi/settings.py); it acts once a day.
System backup jobs run on the job engine (``jobs.run``; the kinds are registered by
BackupsConfig), which also recovers them when a worker dies.
"""

from __future__ import annotations

import logging

from celery import shared_task

from backups import services

logger = logging.getLogger(__name__)


@shared_task(name="backups.tasks.scheduled_backup", ignore_result=True)
def scheduled_backup() -> str | None:
    """Beat, hourly: the daily configuration backup when its hour has come."""
    header = services.scheduled_backup_run()
    return header.name if header is not None else None
