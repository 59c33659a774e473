"""The names of retention purges: their job kind, phases and triggers.

A purge is a job of the engine (jobs.Job); its figures are in the job's details.
"""

from __future__ import annotations

from django.db import models

# The job kind (jobs.registry) and conflict group of the retention purge.
PURGE = "purge"
QUARANTINE_RELEASE = "quarantine_release"


class PurgePhase(models.TextChoices):
    """What a running purge is doing (the job's step name)."""

    WAITING = "waiting", "Waiting for the worker"
    MESSAGES = "messages", "Deleting expired messages"
    SMTP_LOG = "smtp_log", "Deleting expired SMTP log entries"
    TRACKING_LOG = "tracking_log", "Deleting expired tracking log entries"
    VACUUM = "vacuum", "Returning free space to the disk"
    DONE = "done", "Done"


class PurgeTrigger(models.TextChoices):
    """Why a purge was started."""

    RETENTION = "retention", "Retention shortened"
    PLANNER = "planner", "Reclaim plan applied"
    SCHEDULE = "schedule", "Daily schedule"
