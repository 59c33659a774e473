"""SMTP > Configuration > Maintenance: SMTP log retention, maintenance mode, and whom mail is
accepted for (the local domains, read-only, and the relay networks)."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from appliance.system.errors import ApplianceError
from appliance.system.maintenance import maintenance_status
from mailsecurity import selectors as mail_selectors
from mailsecurity import services as mail_services
from mailsecurity.views import disk_context, purge_context, refuse_read_only, retention_saved
from smtp import selectors, services
from smtp.engine import PolicyError
from smtp.forms import LogRetentionForm, MaintenanceModeForm, RelayNetworksForm


def _page(
    request: HttpRequest,
    retention_form: LogRetentionForm | None = None,
    mode_form: MaintenanceModeForm | None = None,
    relay_form: RelayNetworksForm | None = None,
    status: int = 200,
) -> HttpResponse:
    context: dict[str, object] = {
        "breadcrumb": "SMTP > Configuration > Maintenance",
        "mode_form": mode_form or MaintenanceModeForm(),
        **disk_context(),
        **purge_context(),
    }
    try:
        log = mail_selectors.log_retention(mail_services.SMTP_LOG)
        context["log"] = log
        context["retention_form"] = retention_form or LogRetentionForm(
            initial={"retention_days": log.retention_days}
        )
        context["maintenance"] = maintenance_status()
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
    try:
        relay = selectors.relay_configuration()
    except (ApplianceError, PolicyError) as exc:
        context["relay_error"] = str(exc)
    else:
        context["relay"] = relay
        context["relay_form"] = relay_form or RelayNetworksForm(
            initial={"relay_networks": "\n".join(relay.relay_networks)}
        )
    return render(request, "smtp/maintenance.html", context, status=status)


@require_http_methods(["GET", "POST"])
def maintenance(request: HttpRequest) -> HttpResponse:
    """The SMTP log's retention (a shorter one starts the retention purge) and the state of
    maintenance mode."""
    if refused := refuse_read_only(request):
        return refused
    if request.method != "POST":
        return _page(request)
    form = LogRetentionForm(request.POST)
    if not form.is_valid():
        return _page(request, retention_form=form, status=400)
    result = mail_services.retention_apply(
        {mail_services.SMTP_LOG: form.cleaned_data["retention_days"]}, user=request.user
    )
    retention_saved(request, result)
    return redirect("smtp:maintenance")


@require_POST
def maintenance_mode(request: HttpRequest) -> HttpResponse:
    """Enter or leave maintenance mode (administrators only)."""
    if refused := refuse_read_only(request):
        return refused
    form = MaintenanceModeForm(request.POST)
    if not form.is_valid():
        return _page(request, mode_form=form, status=400)
    if form.cleaned_data["action"] == "enter":
        state = services.maintenance_mode_enter(form.cleaned_data["reason"], user=request.user)
        messages.warning(
            request, f"Maintenance mode is on ({state.reason}): mail is deferred with 421."
        )
    elif services.maintenance_mode_leave(user=request.user):
        messages.success(request, "Maintenance mode is off: mail is accepted again.")
    else:
        messages.info(request, "Maintenance mode was not on.")
    return redirect("smtp:maintenance")


@require_POST
def relay_networks(request: HttpRequest) -> HttpResponse:
    """Set the networks whose clients may relay to any domain (administrators only)."""
    if refused := refuse_read_only(request):
        return refused
    form = RelayNetworksForm(request.POST)
    if not form.is_valid():
        return _page(request, relay_form=form, status=400)
    networks = form.cleaned_data["relay_networks"]
    services.relay_networks_set(networks, user=request.user)
    if networks:
        messages.success(request, f"Relay networks saved: {', '.join(networks)}.")
    else:
        messages.success(request, "No relay networks: mail is accepted for the local domains only.")
    return redirect("smtp:maintenance")
