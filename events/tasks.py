"""Periodic housekeeping of the event log."""

from celery import shared_task

from events import services


@shared_task
def events_prune() -> int:
    """Beat, daily: delete events past EVENT_RETENTION_DAYS."""
    return services.events_prune()
