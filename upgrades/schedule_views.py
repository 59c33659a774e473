"""Updates > Install > Install at (issue 18): schedule, move and cancel the firmware install.

Each POST parses the typed time, calls one service of upgrades.schedule and goes back to the
Install page with what was done or why not. Administrators only (a read-only user gets 403 even
past the role middleware); CSRF is on as everywhere. :func:`schedule_context` is what the
Install page's ``_schedule.html`` partial reads.
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


def schedule_context() -> dict[str, Any]:
    """The pending schedule, the latest one's outcome, the quietest hour, and the input's
    bounds, on the appliance's clock."""
    pending = schedule.schedule_pending()
    latest = schedule.schedule_latest()
    quiet = schedule.quietest_hour()
    return {
        "schedule_pending": pending,
        "schedule_latest": latest if latest is not None and latest != pending else None,
        "schedule_quiet": quiet,
        "schedule_quiet_value": schedule.input_value(quiet.at) if quiet else "",
        "schedule_min": schedule.input_value(timezone.now()),
        "schedule_value": schedule.input_value(pending.at) if pending else "",
        "schedule_time_zone": timezone.get_current_timezone_name(),
    }


def _back() -> HttpResponse:
    return redirect(reverse("upgrades:install") + "#schedule")


def _change(
    request: HttpRequest,
    service: Callable[[datetime], ScheduledInstall],
    done: Callable[[ScheduledInstall], str],
) -> HttpResponse:
    def action() -> ScheduledInstall:
        return service(schedule.parse_local(request.POST.get("at", "")))

    act(request, action, schedule.ScheduleRefused, done)
    return _back()


@require_POST
@administrators_only
def schedule_set(request: HttpRequest) -> HttpResponse:
    """Install at: schedule the downloaded firmware's install at the typed time."""
    return _change(
        request,
        lambda at: schedule.schedule_set(at=at, user=request.user),
        lambda s: (
            f"The install of firmware {s.version} is scheduled for {schedule.local_text(s.at)}."
        ),
    )


@require_POST
@administrators_only
def schedule_move(request: HttpRequest) -> HttpResponse:
    """Move the pending schedule to the typed time."""
    return _change(
        request,
        lambda at: schedule.schedule_move(at=at, user=request.user),
        lambda s: f"The install of firmware {s.version} now starts at {schedule.local_text(s.at)}.",
    )


@require_POST
@administrators_only
def schedule_cancel(request: HttpRequest) -> HttpResponse:
    """Cancel the pending schedule (nothing is installed)."""
    act(
        request,
        lambda: schedule.schedule_cancel(user=request.user),
        schedule.ScheduleRefused,
        lambda s: (
            f"The install of firmware {s.version} at {schedule.local_text(s.at)} is cancelled."
        ),
    )
    return _back()
