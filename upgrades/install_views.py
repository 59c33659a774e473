"""Updates > Updates & Licensing > Install: the preflight checklist and the install's progress.

The checklist is measured afresh on every visit (disk space changes while you look); the
Install button is enabled only when no check fails, and the service checks again on the POST,
so a stale page cannot start an install that would now fail. The progress page is the run's
persisted state, so it survives a reload and shows the same thing in every session; its panel
is polled with htmx only while the run is active. Changes are for administrators only; abort
and the DHCP pin have a confirmation page first (GET says what happens, POST does it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.roles import READ_ONLY_REFUSAL, is_administrator
from appliance.system import network
from appliance.system.errors import ApplianceError
from lmi.actions import act, administrators_only
from upgrades import install, install_status, preflight_services, selectors
from upgrades.context_processors import banner_context
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
    from upgrades.schedule_views import schedule_context  # issue 18: Install at a time

    context.update(schedule_context())
    from upgrades.rehearsal import rehearsal_panel  # issue 18: Rehearse, figures by the estimate

    context["rehearsal"] = rehearsal_panel()
    from upgrades.returning import return_available  # issue 18: Return to the old firmware

    context["way_back"] = return_available()
    context["checks"] = preflight_services.with_last_rehearsal(checks)
    return render(request, "upgrades/install.html", context)


@require_POST
@administrators_only
def install_start(request: HttpRequest) -> HttpResponse:
    """Install: preflight again, then start the run and show its progress."""
    return start_run(
        request,
        lambda: install.install_start(user=request.user, trigger=InstallTrigger.CONSOLE),
        refused="The install did not start",
        started="Installing firmware",
    )


def start_run(
    request: HttpRequest,
    start: Callable[[], InstallRun],
    *,
    refused: str,
    started: str,
    back: str = "",
) -> HttpResponse:
    """Start an install run (an install or a return) and show its progress; refused, the
    reason on the Install page (at ``back``), or the run in progress when that is why."""
    try:
        run = start()
    except install.InstallInProgress as exc:
        messages.error(request, str(exc))
        active = install_status.active_run()
        if active is not None:
            return redirect("upgrades:install_run", run_id=active.pk)
        return redirect("upgrades:install")
    except install.InstallError as exc:
        messages.error(request, f"{refused}: {exc}")
        return redirect(reverse("upgrades:install") + back)
    messages.success(request, f"{started} {run.version}.")
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


@never_cache
@require_GET
def install_banner_watch(request: HttpRequest) -> HttpResponse:
    """Every page's empty banner slot, polled every 10 s while no install runs: a page loaded
    before an install (started from the CLI, a schedule or another session) shows its banner
    within seconds, then follows it as :func:`install_banner` does; one that began and ended
    between two looks is said to have ended (``after``: the newest run when the page was made).
    """
    try:
        after = max(0, int(request.GET.get("after", "0")))
    except ValueError:
        after = 0
    return render(
        request,
        "upgrades/_install_banner.html",
        banner_context(install_status.active_run(), after=after),
    )


@never_cache
@require_GET
def install_banner(request: HttpRequest, run_id: int) -> HttpResponse:
    """Every page's install banner alone, polled every 2 s while the run ``run_id`` is active.

    The phase moves on with the install; once the run has ended the banner says how, once,
    and stops polling: the page under it was rendered as during the install (read-only from
    phase 3), so it asks for a reload rather than pretend the forms are back.
    """
    context: dict[str, Any] = {}
    if install_status.active_run() is None:
        context["install_banner_ended"] = InstallRun.objects.filter(pk=run_id).first()
    return render(request, "upgrades/_install_banner.html", context)


@require_GET
def install_run(request: HttpRequest, run_id: int) -> HttpResponse:
    """The run's phase timeline, times, who started it, the log tail, and Abort in 1-2."""
    run = _run_or_404(run_id)
    context = {"breadcrumb": BREADCRUMB, **_progress_context(run)}
    from upgrades.validation import validation_read  # issue 18: the proof after the upgrade

    context["validation_report"] = validation_read(run) if context["succeeded"] else None
    return render(request, "upgrades/install_run.html", context)


@never_cache
@require_GET
def install_run_partial(request: HttpRequest, run_id: int) -> HttpResponse:
    """The progress panel alone; it asks to be polled again only while the run is active."""
    run = _run_or_404(run_id)
    return render(request, "upgrades/_install_progress.html", _progress_context(run))


def _confirm(request: HttpRequest, breadcrumb: str, **confirm: object) -> HttpResponse:
    """An Install page action's confirmation page (templates/_confirm.html)."""
    page = {"back": reverse("upgrades:install"), "back_label": "Back to Install", **confirm}
    return render(
        request, "_confirm.html", {"breadcrumb": f"{BREADCRUMB} > {breadcrumb}", "confirm": page}
    )


def _refused_for_read_only(request: HttpRequest) -> HttpResponse | None:
    if not is_administrator(request.user):
        return HttpResponseForbidden(READ_ONLY_REFUSAL)
    return None


@require_http_methods(["GET", "POST"])
def install_abort(request: HttpRequest, run_id: int) -> HttpResponse:
    """Abort while in phases 1-2: GET is the confirmation, POST asks the run to stop (the staged
    system is discarded, the appliance is untouched)."""
    run = _run_or_404(run_id)
    if request.method == "POST":
        if refused := _refused_for_read_only(request):
            return refused
        act(
            request,
            lambda: install.install_abort(user=request.user, run_id=run_id),
            install.InstallError,
            lambda run: f"Aborting the install of firmware {run.version}.",
        )
        return redirect("upgrades:install_run", run_id=run_id)
    refusal = ""
    if run.abort_requested and run.is_active:
        refusal = "The install is being aborted already."
    elif not run.can_abort:
        refusal = (
            f"The install is {run.get_state_display().lower()} in phase {run.phase}: it can be "
            "aborted only in phases 1 and 2. From phase 3 it completes, or rolls back by itself "
            "on any failure."
        )
    return _confirm(
        request,
        "Abort",
        title=f"Abort the install of firmware {run.version}",
        facts=[
            ("Firmware", f"{run.version} over {run.from_version or 'the running firmware'}"),
            ("Phase", f"{run.phase} of 10 ({run.get_state_display().lower()})"),
            ("Started by", run.requested_by or "—"),
        ],
        consequences=[
            "The install stops at the end of its current step; the new system downloaded and "
            "staged so far is discarded.",
            f"The appliance keeps running firmware {run.from_version or 'it runs now'}, "
            "untouched; mail is not interrupted.",
            "The downloaded firmware stays ready: the install can be started again later.",
        ],
        refusal=refusal,
        action=reverse("upgrades:install_abort", args=[run.pk]),
        button="Abort the install",
        testid="install-abort-confirm",
        back=reverse("upgrades:install_run", args=[run.pk]),
        back_label="Back to the install",
        admin_does="aborts an install.",
    )


def _interface_named(name: str, candidates: list[network.Interface]) -> network.Interface | None:
    return next((iface for iface in candidates if iface.name == name), None)


def _interface_change(
    request: HttpRequest,
    change: Callable[..., network.Interface],
    done: Callable[[network.Interface], str],
) -> HttpResponse:
    """The POST of Pin and Return to DHCP: administrators only, one service call, back to
    Install with what was done or why not."""
    if refused := _refused_for_read_only(request):
        return refused
    name = request.POST.get("interface", "")
    act(
        request,
        lambda: change(user=request.user, interface=name),
        preflight_services.PinRefused,
        done,
    )
    return redirect("upgrades:install")


def _interface_confirm(
    request: HttpRequest, breadcrumb: str, url_name: str, name: str, **confirm: object
) -> HttpResponse:
    """The confirmation of Pin and Return to DHCP: the button POSTs the interface's name."""
    return _confirm(
        request,
        breadcrumb,
        action=reverse(url_name),
        fields=[("interface", name)],
        button_class="primary",
        **confirm,
    )


@require_http_methods(["GET", "POST"])
def install_pin_interface(request: HttpRequest) -> HttpResponse:
    """Pin a DHCP interface's current address as static for the upgrade: GET (?interface=)
    confirms, POST pins."""
    if request.method == "POST":
        return _interface_change(
            request,
            preflight_services.interface_pin_static,
            lambda pinned: (
                f"Interface {pinned.name} now keeps {pinned.cidr} as a static address. "
                "Return it to DHCP after the upgrade."
            ),
        )
    name = request.GET.get("interface", "")[:40]
    dhcp, _pinned, error = _dhcp_interfaces()
    iface = _interface_named(name, dhcp)
    refusal = error or ("" if iface else f"There is no interface {name!r} on DHCP.")
    if iface is not None and iface.address is None:
        refusal = f"Interface {name} holds no DHCP lease right now: there is no address to pin."
    address = (iface.cidr if iface else None) or "—"
    return _interface_confirm(
        request,
        "Pin address",
        "upgrades:install_pin",
        name,
        title=f"Pin the address of {name} as static",
        facts=[("Interface", name), ("Leased address", address)],
        consequences=[
            f"Interface {name} keeps {address} as a static address and stops asking the DHCP "
            "server, so the restarts of the upgrade cannot change its address.",
            "The DHCP server is not told: make sure it does not give this address to another "
            "host meanwhile.",
            "Return the interface to DHCP on this page once the upgrade is complete.",
        ],
        refusal=refusal,
        button=f"Pin {name} as static",
        testid="pin-confirm",
        admin_does="pins interfaces.",
    )


@require_http_methods(["GET", "POST"])
def install_unpin_interface(request: HttpRequest) -> HttpResponse:
    """Return an interface pinned for the upgrade to DHCP: GET (?interface=) confirms, POST
    does it."""
    if request.method == "POST":
        return _interface_change(
            request,
            preflight_services.interface_unpin,
            lambda restored: f"Interface {restored.name} is on DHCP again.",
        )
    name = request.GET.get("interface", "")[:40]
    _dhcp, pinned, error = _dhcp_interfaces()
    iface = _interface_named(name, pinned)
    refusal = error or ("" if iface else f"Interface {name!r} is not pinned for the upgrade.")
    return _interface_confirm(
        request,
        "Return to DHCP",
        "upgrades:install_unpin",
        name,
        title=f"Return {name} to DHCP",
        facts=[("Interface", name), ("Pinned address", (iface.cidr if iface else None) or "—")],
        consequences=[
            f"Interface {name} asks the DHCP server for its address again.",
            "The server may give it another address: the console and the mail service are "
            "then reached at the new one.",
        ],
        refusal=refusal,
        button=f"Return {name} to DHCP",
        testid="unpin-confirm",
        admin_does="returns interfaces to DHCP.",
    )


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
