"""The validation report of an install: on the run's page, as JSON and as a printable page.

Reads only, so read-only accounts see it too (every page needs a login: the middleware). The
report is the file phase 10 wrote (upgrades.validation); a run without one answers 404.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from appliance.firmware import validationfile
from upgrades import validation
from upgrades.models import InstallRun


def _report_or_404(run_id: int) -> tuple[InstallRun, dict[str, Any]]:
    run = InstallRun.objects.filter(pk=run_id).first()
    if run is None:
        raise Http404(f"There is no install run {run_id}.")
    report = validation.validation_read(run)
    if report is None:
        raise Http404(f"Install run {run_id} has no validation report.")
    return run, report


@require_GET
def validation_json(request: HttpRequest, run_id: int) -> HttpResponse:
    """The report as written, as a download."""
    _, report = _report_or_404(run_id)
    response = HttpResponse(
        json.dumps(report, indent=2, sort_keys=True) + "\n",
        content_type="application/json",
    )
    name = validationfile.report_name(run_id)
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@require_GET
def validation_print(request: HttpRequest, run_id: int) -> HttpResponse:
    """The report on a page of its own, without the console's menus, for printing."""
    run, report = _report_or_404(run_id)
    return render(request, "upgrades/validation_print.html", {"run": run, "report": report})
