"""Reads of the event log."""

from __future__ import annotations

from events.models import Event


def recent_events(limit: int) -> list[Event]:
    """The newest events, for summaries such as the home page."""
    return list(Event.objects.order_by("-created_at", "-id")[:limit])
