"""System > Events."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from events.selectors import recent_events


@require_GET
def event_list(request: HttpRequest) -> HttpResponse:
    """The event log (first cut: newest 50; filters and paging follow)."""
    return render(
        request,
        "events/list.html",
        {"breadcrumb": "System > Events", "events": recent_events(50)},
    )
