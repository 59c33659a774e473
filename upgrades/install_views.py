"""Updates > Updates & Licensing > Install: the preflight checklist and the install's progress.

The checklist is measured afresh on every visit (disk space changes while you look); the
Install button is enabled only when no check fails, and the service checks again on the POST,
so a stale page cannot start an install that would now fail. The progress page is the run's
persisted state, so it survives a reload and shows the same thing in every session; its panel
is polled with htmx only while the run is active. Changes are for administrators only.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance.system import network
from appliance.system.errors import ApplianceError
from lmi.actions import act, administrators_only
from upgrades import install, install_status, preflight_services, selectors
from upgrades.models import InstallRun, InstallState, InstallTrigger
from upgrades.story import update_story

BREADCRUMB = "Updates > Updates & Licensing > Install"
# Checks whose remedy is freeing disk space: they link to retention and the reclaim planner.
DISK_CHECKS = frozenset({"disk-msgstore", "disk-console", "space-for-upgrade"})
LOG_LINES = 200


def _dhcp_interfaces() -> tuple[list[network.Interface], list[network.Interface], str]:
    """Interfaces on DHCP (each can be pinned), those pinned for the upgrade (each can return to
    DHCP), and a reason when they cannot be read."""
    try:
        interfaces = network.list_interfaces()
    except ApplianceError as exc:
        return [], [], str(exc)
    dhcp = [i for i in interfaces if i.mode == "dhcp"]
    return dhcp, [i for i in interfaces if i.mode == "static" and i.pinned_from_dhcp], ""


@require_GET
def install_checklist(request: HttpRequest) -> HttpResponse:
    """The preflight checklist and the Install button (enabled when nothing fails)."""
    context: dict[str, Any] = {"breadcrumb": BREADCRUMB, "disk_checks": DISK_CHECKS}
    try:
        checks = install.install_preflight(user=request.user)
    except (ApplianceError, install.InstallError) as exc:
        checks = []
        context["appliance_error"] = f"The checks could not run: {exc}"
    failed = [check for check in checks if check.status == "fail"]
    active = install_status.active_run()
    dhcp, pinned, dhcp_error = _dhcp_interfaces()
    story = update_story()
    context.update(
        {
            "checks": checks,
            "failed": failed,
            "warnings": [check for check in checks if check.status == "warn"],
            "active_run": active,
            "latest_run": install_status.latest_run(),
            "story": story,
            "ready": selectors.ready_download(story.installed) if story.ready_version else None,
            "installed": story.installed,
            "dhcp_interfaces": dhcp,
            "pinned_interfaces": pinned,
            "dhcp_error": dhcp_error,
            "install_possible": bool(checks)
            and not failed
            and active is None
            and story.ready_version is not None,
            "backup_available": _backup_download_available(),
        }
    )
    return render(request, "upgrades/install.html", context)


@require_POST
@administrators_only
def install_start(request: HttpRequest) -> HttpResponse:
    """Install: preflight again, then start the run and show its progress."""
    try:
        run = install.install_start(user=request.user, trigger=InstallTrigger.CONSOLE)
    except install.InstallInProgress as exc:
        messages.error(request, str(exc))
        active = install_status.active_run()
        if active is not None:
            return redirect("upgrades:install_run", run_id=active.pk)
        return redirect("upgrades:install")
    except install.InstallError as exc:
        messages.error(request, f"The install did not start: {exc}")
        return redirect("upgrades:install")
    messages.success(request, f"Installing firmware {run.version}.")
    return redirect("upgrades:install_run", run_id=run.pk)


def _run_or_404(run_id: int) -> InstallRun:
    run = InstallRun.objects.filter(pk=run_id).first()
    if run is None:
        raise Http404(f"There is no install run {run_id}.")
    return run


def _progress_context(run: InstallRun) -> dict[str, Any]:
    phases = install_status.run_phases(run)
    try:
        log_tail = [line.rstrip("\n") for line in install.install_log_tail(run, lines=LOG_LINES)]
        log_error = ""
    except (ApplianceError, OSError) as exc:
        log_tail, log_error = [], f"The install log cannot be read: {exc}"
    succeeded = run.state == InstallState.SUCCEEDED
    return {
        "run": run,
        "phases": phases,
        "pinned_interfaces": _dhcp_interfaces()[1] if succeeded else [],
        "eta_seconds": install_status.run_eta_seconds(run, phases),
        "log_tail": log_tail,
        "log_error": log_error,
        "succeeded": succeeded,
        "events_url": reverse("events:list") + "?category=update",
    }


@require_GET
def install_run(request: HttpRequest, run_id: int) -> HttpResponse:
    """The run's phase timeline, times, who started it, the log tail, and Abort in 1-2."""
    run = _run_or_404(run_id)
    context = {"breadcrumb": BREADCRUMB, **_progress_context(run)}
    return render(request, "upgrades/install_run.html", context)


@never_cache
@require_GET
def install_run_partial(request: HttpRequest, run_id: int) -> HttpResponse:
    """The progress panel alone; it asks to be polled again only while the run is active."""
    run = _run_or_404(run_id)
    return render(request, "upgrades/_install_progress.html", _progress_context(run))


@require_POST
@administrators_only
def install_abort(request: HttpRequest, run_id: int) -> HttpResponse:
    """Abort while in phases 1-2: the staged system is discarded, the appliance is untouched."""
    _run_or_404(run_id)
    act(
        request,
        lambda: install.install_abort(user=request.user, run_id=run_id),
        install.InstallError,
        lambda run: f"Aborting the install of firmware {run.version}.",
    )
    return redirect("upgrades:install_run", run_id=run_id)


@require_POST
@administrators_only
def install_pin_interface(request: HttpRequest) -> HttpResponse:
    """Pin a DHCP interface's current address as static for the upgrade."""
    name = request.POST.get("interface", "")
    act(
        request,
        lambda: preflight_services.interface_pin_static(user=request.user, interface=name),
        preflight_services.PinRefused,
        lambda pinned: (
            f"Interface {pinned.name} now keeps {pinned.cidr} as a static address. "
            "Return it to DHCP after the upgrade."
        ),
    )
    return redirect("upgrades:install")


@require_POST
@administrators_only
def install_unpin_interface(request: HttpRequest) -> HttpResponse:
    """Return an interface pinned for the upgrade to DHCP."""
    name = request.POST.get("interface", "")
    act(
        request,
        lambda: preflight_services.interface_unpin(user=request.user, interface=name),
        preflight_services.PinRefused,
        lambda restored: f"Interface {restored.name} is on DHCP again.",
    )
    return redirect("upgrades:install")


def _backup_download_available() -> bool:
    try:
        reverse("backups:config_download", args=["x.lmibackup"])
    except NoReverseMatch:
        return False
    return True


@require_POST
@administrators_only
def install_config_backup(request: HttpRequest) -> HttpResponse:
    """Take a configuration backup now and download it (the rescue image will be overwritten)."""
    try:
        from backups import services as backup_services
    except ImportError:
        messages.error(request, "Configuration backups are not available in this console.")
        return redirect("upgrades:install")
    try:
        header = backup_services.config_backup_create(
            user=request.user, comment="Before the firmware upgrade"
        )
    except (backup_services.BackupError, ApplianceError, OSError) as exc:
        messages.error(request, f"The configuration backup failed: {exc}")
        return redirect("upgrades:install")
    return redirect("backups:config_download", header.name)
