"""Updates > Updates & Licensing."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from appliance import updatelogs
from appliance.errors import ApplianceNotInitialized
from appliance.system import system_info


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """The installed firmware and the firmware logs of var/spool/updates/XPU."""
    try:
        context: dict[str, object] = {
            "system": system_info(),
            "update_logs": updatelogs.list_logs(),
        }
    except ApplianceNotInitialized as exc:
        context = {"appliance_error": str(exc)}
    context["breadcrumb"] = "Updates > Updates & Licensing"
    return render(request, "upgrades/index.html", context)
