"""Home, Home > System, Home > Resources, and /healthz."""

from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from appliance.mail import msgstore
from appliance.system import network, rescue
from appliance.system.errors import ApplianceError
from appliance.system.facts import system_info
from events.selectors import recent_events
from home import charts, graphs, health, selectors
from home.notifications import current_notices


def _appliance_context() -> dict[str, object]:
    """What the appliance says about itself, or why it cannot say it."""
    try:
        return {
            "system": system_info(),
            "interfaces": network.list_interfaces(),
            "store_totals": msgstore.totals(),
            "system_backup": rescue.system_backup_info(),
            "appliance_error": "",
        }
    except ApplianceError as exc:
        # Missing, half-built or damaged: the page says which file and why, never a 500.
        return {"appliance_error": str(exc)}


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """Home: notifications, a summary of the system, the processing graphs' place."""
    context = {
        "breadcrumb": "Home",
        "notices": current_notices(),
        "host": selectors.host_figures(),
        "disks": selectors.upgrade_disks(),
        "events": recent_events(8),
        **_appliance_context(),
        **_graphs_context(request),
    }
    return render(request, "home/index.html", context)


def _graphs_context(request: HttpRequest) -> dict[str, object]:
    panel = graphs.processing_graphs(request.GET.get("range"))
    return {
        "graph_panel": panel,
        "charts": [{"graph": graph, "svg": charts.render(graph)} for graph in panel.graphs],
        "ranges": graphs.RANGES.values(),
    }


@require_GET
def graphs_partial(request: HttpRequest) -> HttpResponse:
    """The processing graphs alone: the range links and the minute refresh load this."""
    return render(request, "home/_graphs.html", _graphs_context(request))


@require_GET
def notifications_partial(request: HttpRequest) -> HttpResponse:
    """The notification area alone, polled by htmx so notices appear without a reload."""
    return render(request, "home/_notifications.html", {"notices": current_notices()})


@require_GET
def system(request: HttpRequest) -> HttpResponse:
    """Home > System: firmware level, OS, host name, uptime, model, network per interface."""
    context = {
        "breadcrumb": "Home > System",
        "host": selectors.host_figures(),
        "platform": selectors.host_platform(),
        **_appliance_context(),
    }
    return render(request, "home/system.html", context)


def _resources_context() -> dict[str, object]:
    disks = selectors.upgrade_disks()
    return {
        "disks": disks,
        "any_disk_fails": any(not disk.meets_upgrade_requirement for disk in disks),
        "host": selectors.host_figures(),
        "reclaim_links": selectors.reclaim_links(),
        "required_percent": selectors.upgrade_free_percent(),
    }


@require_GET
def resources(request: HttpRequest) -> HttpResponse:
    """Home > Resources: the upgrade-relevant disks against the free-space rule in force (with
    what each lever frees when a disk fails it), memory, CPU, load."""
    return render(
        request, "home/resources.html", {"breadcrumb": "Home > Resources", **_resources_context()}
    )


@require_GET
def resources_partial(request: HttpRequest) -> HttpResponse:
    """The figures alone, refreshed by htmx every few seconds."""
    return render(request, "home/_resources.html", _resources_context())


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Database, Redis and worker up or down, for monitors and compose health checks.

    Public on purpose (a health check cannot log in) and so it says nothing but up or down.
    """
    report = health.check_all()
    return JsonResponse(report.as_dict(), status=200 if report.ok else 503)
