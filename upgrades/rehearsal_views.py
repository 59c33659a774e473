"""Updates > Install > Rehearse: start a rehearsal of the install, cancel it, and its panel.

The rehearsal changes nothing the appliance uses, but it takes a snapshot and fills a scratch
folder, so starting one is for administrators (server-side check; CSRF as everywhere). The
panel is the job's stored state and report, polled with htmx only while the rehearsal runs.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from jobs.models import JobState
from lmi.actions import act, administrators_only
from upgrades import rehearsal


@require_POST
@administrators_only
def rehearsal_start(request: HttpRequest) -> HttpResponse:
    """Rehearse: queue the rehearsal and come back to the Install page's panel."""
    try:
        job = rehearsal.rehearsal_start(user=request.user, trigger="console")
    except rehearsal.RehearsalError as exc:
        messages.error(request, f"The rehearsal did not start: {exc}")
    else:
        messages.success(
            request,
            f"{job.title} started: the live appliance keeps serving mail meanwhile.",
        )
    return redirect(reverse("upgrades:install") + "#rehearsal")


@require_POST
@administrators_only
def rehearsal_cancel(request: HttpRequest) -> HttpResponse:
    """Cancel: the job engine's cancel; the rehearsal stops at its next chunk."""
    act(
        request,
        lambda: rehearsal.rehearsal_cancel(user=request.user),
        rehearsal.RehearsalError,
        lambda job: (
            f"{job.title} was cancelled."
            if job.state == JobState.CANCELLED
            else f"{job.title} stops at its next step; its scratch folder is removed."
        ),
    )
    return redirect(reverse("upgrades:install") + "#rehearsal")


@never_cache
@require_GET
def rehearsal_partial(request: HttpRequest) -> HttpResponse:
    """The rehearsal panel alone; it asks to be polled again only while one runs. (``can_change``
    comes from the context processor, so Rehearse comes back when the polled one ends.)"""
    return render(request, "upgrades/_rehearsal.html", {"rehearsal": rehearsal.rehearsal_panel()})
