"""Events made in bulk with chosen times, for the paging, filter and export tests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from events.models import Category, Event, Severity
from events.services import event_write

MakeEvents = Callable[..., list[Event]]


def event_with_every_field(category: Category, message: str, details: dict) -> Event:
    """One event written with every field filled: a warning by user admin on node mx1, with
    ``details``; the page and the export must show each of them."""
    return event_write(
        category=category,
        message=message,
        severity=Severity.WARNING,
        user="admin",
        details=details,
        node="mx1",
    )


@pytest.fixture
def make_events(db) -> MakeEvents:
    """make_events(n, at=..., step=..., **fields): n events, the first at `at`, each `step`
    later (step 0: all share one timestamp). Returns them oldest first, ids ascending."""

    def make(
        count: int,
        *,
        at: datetime | None = None,
        step: timedelta = timedelta(seconds=1),
        severity: Severity = Severity.INFO,
        category: Category = Category.SYSTEM,
        node: str = "central",
        username: str = "",
        message: str = "Event {n}",
        details: dict | None = None,
    ) -> list[Event]:
        start = at or timezone.now() - timedelta(hours=1)
        return Event.objects.bulk_create(
            Event(
                created_at=start + n * step,
                severity=severity,
                category=category,
                node=node,
                username=username,
                message=message.format(n=n),
                details=details or {},
            )
            for n in range(count)
        )

    return make
