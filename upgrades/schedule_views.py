"""Updates > Install > Install at (issue 18): schedule, move and cancel the firmware install.

Each POST parses the typed time, calls one service of upgrades.schedule and goes back to the
Install page with what was done or why not. Administrators only (a read-only user gets 403 even
past the role middleware); CSRF is on as everywhere. :func:`schedule_context` is what the
``_schedule.html`` partial reads, on the Install page (the install of this appliance) and on the
Cluster page (a rolling upgrade of the cluster): each form posts its ``kind``, and the answer
goes back to the page of that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from lmi.actions import act, administrators_only
from upgrades import schedule
from upgrades.models import ScheduledInstall


def schedule_context(kind: str = schedule.INSTALL) -> dict[str, Any]:
    """The pending schedule (of any kind: one is pending at a time), the latest one's outcome,
    what ``kind`` would install now (or why nothing), the quietest hour, and the input's bounds,
    on the appliance's clock."""
    pending = schedule.schedule_pending()
    latest = schedule.schedule_latest()
    if latest is not None and latest == pending:
        latest = None
    quiet = schedule.quietest_hour()
    try:
        offer, nothing = schedule.kind_named(kind).version(), ""
    except schedule.ScheduleRefused as exc:
        offer, nothing = None, str(exc)
    return {
        "schedule_kind": kind,
        "schedule_offer": offer,
        "schedule_nothing": nothing,
        "schedule_pending": pending,
        "schedule_pending_title": schedule.schedule_title(pending) if pending else "",
        "schedule_latest": latest,
        "schedule_latest_title": schedule.schedule_title(latest) if latest else "",
        "schedule_latest_kind": schedule.kind_of(latest).name if latest else "",
        "schedule_quiet": quiet,
        "schedule_quiet_value": schedule.input_value(quiet.at) if quiet else "",
        "schedule_min": schedule.input_value(timezone.now()),
        "schedule_value": schedule.input_value(pending.at) if pending else "",
        "schedule_time_zone": timezone.get_current_timezone_name(),
    }


def _kind(request: HttpRequest) -> str:
    return request.POST.get("kind") or schedule.INSTALL


def _back(request: HttpRequest) -> HttpResponse:
    """To the page the form was on: the Install page, or the page of the kind it posted."""
    try:
        page = schedule.kind_named(_kind(request)).page
    except schedule.ScheduleRefused:
        page = "upgrades:install"
    return redirect(reverse(page) + "#schedule")


def _what(s: ScheduledInstall) -> str:
    """ "the install of firmware 2.8.1.0", as a flash message says it."""
    title = schedule.schedule_title(s)
    return f"The {title[:1].lower()}{title[1:]}"


def _change(
    request: HttpRequest,
    service: Callable[[datetime], ScheduledInstall],
    done: Callable[[ScheduledInstall], str],
) -> HttpResponse:
    def action() -> ScheduledInstall:
        return service(schedule.parse_local(request.POST.get("at", "")))

    act(request, action, schedule.ScheduleRefused, done)
    return _back(request)


@require_POST
@administrators_only
def schedule_set(request: HttpRequest) -> HttpResponse:
    """Install at (or Upgrade the cluster at): schedule the downloaded firmware's install at
    the typed time."""
    return _change(
        request,
        lambda at: schedule.schedule_set(at=at, user=request.user, kind=_kind(request)),
        lambda s: f"{_what(s)} is scheduled for {schedule.local_text(s.at)}.",
    )


@require_POST
@administrators_only
def schedule_move(request: HttpRequest) -> HttpResponse:
    """Move the pending schedule to the typed time."""
    return _change(
        request,
        lambda at: schedule.schedule_move(at=at, user=request.user),
        lambda s: f"{_what(s)} now starts at {schedule.local_text(s.at)}.",
    )


@require_POST
@administrators_only
def schedule_cancel(request: HttpRequest) -> HttpResponse:
    """Cancel the pending schedule (nothing is installed)."""
    act(
        request,
        lambda: schedule.schedule_cancel(user=request.user),
        schedule.ScheduleRefused,
        lambda s: f"{_what(s)} at {schedule.local_text(s.at)} is cancelled.",
    )
    return _back(request)
