"""Writing events: event_write is the one way anything in LMI records that something happened."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils import timezone

from events.models import Category, Event, Severity

logger = logging.getLogger("lmi.events")

# Keys whose values must never reach the event log (or the process log), whatever the caller
# passes: the log is readable by read-only users and exported as CSV.
# Whoever acted: a signed-in user, a name (a command, "system"), or an anonymous request.
User = AbstractBaseUser | AnonymousUser | str

SECRET_KEYS = frozenset({"password", "passphrase", "secret", "token", "key", "api_key"})


def _scrub(details: Mapping[str, Any]) -> dict[str, Any]:
    """Replace secret-looking values so a careless caller cannot leak them into the log."""
    clean: dict[str, Any] = {}
    for name, value in details.items():
        if name.lower() in SECRET_KEYS or name.lower().endswith(("_password", "_secret")):
            clean[name] = "***"
        elif isinstance(value, Mapping):
            clean[name] = _scrub(value)
        else:
            clean[name] = value
    return clean


def username_of(user: User | None) -> str:
    """The name an event or a job records for whoever acted: a user, a name, or nobody."""
    if isinstance(user, str):
        return user
    if user is not None and user.is_authenticated:
        return user.get_username()
    return ""


def event_write(
    *,
    category: Category | str,
    message: str,
    severity: Severity | int = Severity.INFO,
    user: AbstractBaseUser | AnonymousUser | str | None = None,
    details: Mapping[str, Any] | None = None,
    node: str | None = None,
    created_at: datetime | None = None,
) -> Event:
    """Record one event, and mirror it to the process log for operators tailing the service.

    ``node`` and ``created_at`` are for events a cluster member reports to Central (they keep
    the member's name and time); everything else records what happens here, now.
    """
    username = username_of(user)
    event = Event.objects.create(
        created_at=created_at or timezone.now(),
        severity=int(severity),
        category=str(category),
        node=node or settings.NODE_NAME,
        username=username[:150],
        message=message[:500],
        details=_scrub(details or {}),
    )
    logger.log(
        int(severity),
        "[%s] %s%s",
        event.category,
        event.message,
        f" (user {username})" if username else "",
    )
    return event


def events_prune(batch_size: int = 10_000) -> int:
    """Delete events older than the retention, in batches so the log stays usable meanwhile."""
    from datetime import timedelta

    cutoff = timezone.now() - timedelta(days=settings.EVENT_RETENTION_DAYS)
    total = 0
    while True:
        ids = list(
            Event.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:batch_size]
        )
        if not ids:
            break
        deleted, _ = Event.objects.filter(id__in=ids).delete()
        total += deleted
    if total:
        event_write(
            category=Category.SYSTEM,
            message=f"Deleted {total} events older than {settings.EVENT_RETENTION_DAYS} days",
            details={"deleted": total},
        )
    return total
