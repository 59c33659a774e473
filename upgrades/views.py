"""Updates > Updates & Licensing: firmware level, feed checks, download, license, firmware logs.

Views parse, call one service, and redirect back with a message. Changes are for
administrators only (the read-only middleware refuses them earlier too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance.config import policy, store
from appliance.firmware import preflight, updatelogs
from appliance.mail import msgstore
from appliance.system.errors import ApplianceError
from appliance.system.facts import system_info
from lmi.actions import act, administrators_only
from upgrades import selectors, services
from upgrades.forms import DownloadForm, LicenseUploadForm, UpdateSettingsForm
from upgrades.models import CheckTrigger, DownloadTrigger
from upgrades.notifications import update_notices
from upgrades.story import update_story


def _download_context() -> dict[str, object]:
    installed = selectors.installed_version()
    active = selectors.active_download()
    latest = active or selectors.latest_download()
    return {
        "download": latest,
        "download_active": active is not None,
        "ready": selectors.ready_download(installed),
    }


@dataclass(frozen=True)
class PreflightFigures:
    """What the preflight measures on this appliance, shown beside the vendor's release notes
    (a signed document that cannot know this appliance's store or policy files)."""

    required_percent: float
    downtime: str  # "1.1 s", as the checklist says it
    messages: int
    store_bytes: int
    file_objects: int
    files_found: int


def preflight_figures() -> PreflightFigures:
    """The preflight's downtime estimate and $(FILE) count, from the same reads it makes."""
    totals = msgstore.totals()
    store_bytes = totals.bytes if totals else 0
    messages = totals.messages if totals else 0
    objects = store.file_macro_objects()
    found = 0
    for obj in objects:
        try:
            found += policy.object_file(obj).is_file()
        except ValueError:
            continue
    return PreflightFigures(
        required_percent=float(settings.UPGRADE_MIN_FREE_PERCENT),
        downtime=preflight.downtime_text(
            preflight.downtime_estimate_seconds(store_bytes, messages)
        ).removeprefix("about "),
        messages=messages,
        store_bytes=store_bytes,
        file_objects=len(objects),
        files_found=found,
    )


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """Installed firmware, last check, offers, the download, the license, the firmware logs."""
    context: dict[str, object] = {"breadcrumb": "Updates > Updates & Licensing"}
    try:
        context["system"] = system_info()
        context["update_logs"] = updatelogs.list_logs()
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
    # Without them the notes are shown alone; the checklist says what cannot be measured.
    with contextlib.suppress(ApplianceError, OSError):
        context["preflight_figures"] = preflight_figures()
    installed = selectors.installed_version()
    settings_row = selectors.update_settings()
    context.update(
        {
            "last_check": selectors.last_check(),
            "offers": selectors.listed_offers(installed),
            "license": selectors.license_view(),
            "update_settings": settings_row,
            "settings_form": UpdateSettingsForm(
                initial={"automatic_downloads": settings_row.automatic_downloads}
            ),
            "license_form": LicenseUploadForm(),
            # The story leads the page (and moves with the download panel): the notices beside
            # it are the others, not the story told a second time.
            "notices": update_notices(with_story=False),
            "story": update_story(),
            **_download_context(),
        }
    )
    return render(request, "upgrades/index.html", context)


@never_cache
@require_GET
def download_partial(request: HttpRequest) -> HttpResponse:
    """The download panel alone; htmx polls it every second while a download is active.

    The page's story line and its other notices come along out of band, so "Downloading firmware
    X: 45%" at the top moves with the bar and turns into "ready to install" with it.
    """
    context = {
        **_download_context(),
        "story": update_story(),
        "notices": update_notices(with_story=False),
        "oob_notices": True,
    }
    return render(request, "upgrades/_download.html", context)


@never_cache
@require_GET
def story_partial(request: HttpRequest) -> HttpResponse:
    """The story line alone; it polls itself every 2 s while an install or its rollback runs.

    So "Installing firmware X: phase 3 of 10" on Updates & Licensing and the Install page moves
    on with the install, and stops polling once it says how the install ended. (A download's
    story line comes along with the download panel's own poll instead.)
    """
    return render(request, "upgrades/_story.html", {"story": update_story()})


@require_POST
@administrators_only
def check(request: HttpRequest) -> HttpResponse:
    """Check now: ask the feed what firmware exists."""
    result = services.update_check(trigger=CheckTrigger.USER, user=request.user)
    if not result.ok:
        messages.error(request, result.error)
    elif result.newest_available:
        messages.success(request, f"Firmware {result.newest_available} is available.")
    else:
        messages.success(request, "The update feed lists no newer firmware.")
    return redirect("upgrades:index")


@require_POST
@administrators_only
def download(request: HttpRequest) -> HttpResponse:
    """Download: start downloading the firmware (one download at a time)."""
    form = DownloadForm(request.POST)
    if not form.is_valid():
        messages.error(request, "That is not a firmware version.")
        return redirect("upgrades:index")
    act(
        request,
        lambda: services.download_start(
            user=request.user,
            trigger=DownloadTrigger.USER,
            version=form.cleaned_data["version"] or None,
        ),
        services.UpdateError,
        # What was done, not a state: the story line above says where the download is now.
        lambda started: f"Started the download of firmware {started.version}.",
    )
    return redirect("upgrades:index")


@require_POST
@administrators_only
def cancel(request: HttpRequest) -> HttpResponse:
    """Cancel the download in progress; its part file is deleted."""
    act(
        request,
        lambda: services.download_cancel(user=request.user),
        services.UpdateError,
        lambda cancelled: f"The download of firmware {cancelled.version} was cancelled.",
    )
    return redirect("upgrades:index")


@require_POST
@administrators_only
def update_settings(request: HttpRequest) -> HttpResponse:
    """Automatic firmware downloads on or off."""
    form = UpdateSettingsForm(request.POST)
    form.is_valid()  # a checkbox: absent means off
    enabled = bool(form.cleaned_data.get("automatic_downloads"))
    services.automatic_downloads_set(enabled=enabled, user=request.user)
    messages.success(request, f"Automatic firmware downloads are {'on' if enabled else 'off'}.")
    return redirect("upgrades:index")


@require_POST
@administrators_only
def license_upload(request: HttpRequest) -> HttpResponse:
    """Install an uploaded license file (tampered, foreign or unsigned files are refused)."""
    form = LicenseUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, error)
        return redirect("upgrades:index")
    installed = act(
        request,
        lambda: services.license_install(form.cleaned_data["license_file"], user=request.user),
        services.UpdateError,
        lambda installed: (
            f"License installed for {installed.customer}: firmware updates until "
            f"{installed.updates_until:%Y-%m-%d}."
        ),
    )
    if installed is not None:
        lic = selectors.license_view()
        if not lic.entitled:
            messages.warning(request, f"{lic.reason} Firmware downloads stay refused.")
    return redirect("upgrades:index")


@require_GET
def update_log(request: HttpRequest, name: str) -> HttpResponse:
    """One firmware log as text, for administrators and read-only users alike.

    Only a name the log listing shows is served (anything else is a 404), so no request can
    reach a file outside var/spool/updates/XPU.
    """
    try:
        shown = updatelogs.log_read(name)
    except ApplianceError:
        shown = None
    if shown is None:
        raise Http404("No such firmware log.")
    return render(
        request,
        "upgrades/update_log.html",
        {"breadcrumb": "Updates > Updates & Licensing > Firmware log", "shown": shown},
    )
