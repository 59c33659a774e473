"""Periodic housekeeping for accounts."""

from celery import shared_task

from accounts import services


@shared_task
def login_failures_prune() -> int:
    """Beat: drop failed-login records past the throttle window."""
    return services.login_failures_prune()
