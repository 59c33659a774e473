"""Reads of Updates & Licensing: offers and whether they apply, downloads, checks, the license.

Whether a firmware offer may be downloaded is worked out here, each time it is read, from the
installed firmware: an offer that was new yesterday is "not newer" after an install.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django.utils import timezone

from appliance.firmware import license as appliance_license
from appliance.firmware import spool
from appliance.firmware.bundle import version_tuple
from appliance.system.errors import ApplianceError
from appliance.system.facts import system_info
from jobs.engine import job_dict
from upgrades.models import (
    ACTIVE_STATES,
    FIRMWARE,
    Download,
    DownloadState,
    FirmwareOffer,
    UpdateCheck,
    UpdateSettings,
)

NOT_NEWER = "not newer than the installed firmware"
INSTALLED = "the installed firmware"


@dataclass(frozen=True)
class Eligibility:
    """Whether an offer may be downloaded onto this appliance, and if not, why not."""

    downloadable: bool
    label: str


@dataclass(frozen=True)
class OfferView:
    """An offer with what it means for this appliance."""

    offer: FirmwareOffer
    eligibility: Eligibility

    @property
    def downloadable(self) -> bool:
        return self.eligibility.downloadable


@dataclass(frozen=True)
class LicenseView:
    """The license panel: the installed license (if any) and whether it entitles to updates."""

    customer: str
    serial: str
    updates_until: date | None
    issued_at: datetime | date | None
    valid: bool
    entitled: bool
    reason: str

    @property
    def status_label(self) -> str:
        if self.entitled:
            return "Entitled to updates"
        if self.valid:
            return "Update entitlement ended"
        return "No valid license"


def installed_version() -> str | None:
    """The running firmware level, or None when the appliance cannot say."""
    try:
        return system_info().firmware_version
    except ApplianceError:
        return None


def _vt(version: str) -> tuple[int, ...] | None:
    try:
        return version_tuple(version)
    except (ValueError, TypeError, ApplianceError):
        return None


def offer_eligibility(version: str, min_version: str, installed: str | None) -> Eligibility:
    """May firmware ``version`` (installing over ``min_version`` or later) go on ``installed``?"""
    offered, minimum = _vt(version), _vt(min_version)
    if offered is None or minimum is None:
        return Eligibility(False, "not a valid firmware version")
    if installed is None or (current := _vt(installed)) is None:
        return Eligibility(False, "the installed firmware level is unknown")
    if offered == current:
        return Eligibility(False, INSTALLED)
    if offered < current:
        return Eligibility(False, NOT_NEWER)
    if minimum > current:
        return Eligibility(False, f"needs firmware {min_version} or later (installed: {installed})")
    return Eligibility(True, "newer than the installed firmware")


def listed_offers(installed: str | None = None) -> list[OfferView]:
    """What the feed lists now, newest version first, each with whether it applies here."""
    if installed is None:
        installed = installed_version()
    offers = list(FirmwareOffer.objects.filter(listed=True))
    offers.sort(key=lambda o: (_vt(o.version) or (), o.last_seen_at), reverse=True)
    return [OfferView(o, offer_eligibility(o.version, o.min_version, installed)) for o in offers]


def newest_downloadable(installed: str | None = None) -> OfferView | None:
    for view in listed_offers(installed):
        if view.downloadable:
            return view
    return None


def last_check() -> UpdateCheck | None:
    return UpdateCheck.objects.first()


def check_overdue(max_age: timedelta = timedelta(hours=1)) -> bool:
    """True when the feed was never checked, or not within ``max_age``."""
    check = last_check()
    return check is None or check.checked_at < timezone.now() - max_age


def last_successful_check() -> UpdateCheck | None:
    return UpdateCheck.objects.filter(ok=True).first()


def active_download() -> Download | None:
    return Download.objects.filter(component=FIRMWARE, state__in=ACTIVE_STATES).first()


def latest_download() -> Download | None:
    return Download.objects.filter(component=FIRMWARE).first()


def ready_download(installed: str | None = None) -> Download | None:
    """The newest verified bundle still in the spool and newer than the installed firmware."""
    if installed is None:
        installed = installed_version()
    current = _vt(installed) if installed else None
    for download in Download.objects.filter(component=FIRMWARE, state=DownloadState.READY):
        offered = _vt(download.version)
        if current is not None and offered is not None and offered <= current:
            continue
        if spool.bundle_path(spool.bundle_id(download.version, download.sha256)).is_file():
            return download
    return None


def ready_bundle_of(version: str, sha256: str) -> Download | None:
    """The ready download of exactly this bundle, if its file is still in the spool."""
    download = Download.objects.filter(
        component=FIRMWARE, state=DownloadState.READY, version=version, sha256__iexact=sha256
    ).first()
    if (
        download is not None
        and spool.bundle_path(spool.bundle_id(download.version, download.sha256)).is_file()
    ):
        return download
    return None


def was_rejected(url: str, sha256: str) -> bool:
    """True when this very bundle failed verification before (automatic downloads skip it)."""
    return Download.objects.filter(url=url, sha256__iexact=sha256, rejected=True).exists()


def update_settings() -> UpdateSettings:
    return UpdateSettings.objects.filter(pk=1).first() or UpdateSettings(pk=1)


def license_view() -> LicenseView:
    """The installed license and its entitlement; never raises (a broken file is a reason)."""
    try:
        status = appliance_license.license_status()
    except (ApplianceError, OSError, ValueError) as exc:
        return LicenseView("", "", None, None, False, False, f"the license cannot be read: {exc}")
    lic = status.license
    return LicenseView(
        customer=getattr(lic, "customer", "") if lic else "",
        serial=getattr(lic, "serial", "") if lic else "",
        updates_until=getattr(lic, "updates_until", None) if lic else None,
        issued_at=getattr(lic, "issued_at", None) if lic else None,
        valid=bool(status.valid),
        entitled=bool(status.entitled),
        reason=str(status.reason or ""),
    )


def _iso(value: datetime | date | None) -> str | None:
    return value.isoformat() if value is not None else None


def download_dict(download: Download | None, installed: str | None = None) -> dict[str, Any] | None:
    """A download as plain data; a ready bundle the appliance already runs reads "installed"
    (it is kept for the record, never offered again)."""
    if download is None:
        return None
    state, label = str(download.state), DownloadState(download.state).label
    current, offered = _vt(installed) if installed else None, _vt(download.version)
    if state == DownloadState.READY and current and offered and offered <= current:
        state, label = "installed", "Installed"
    return {
        "id": download.pk,
        "version": download.version,
        "state": state,
        "state_label": label,
        "trigger": str(download.trigger),
        "requested_by": download.requested_by,
        "url": download.url,
        "size": download.size,
        "sha256": download.sha256,
        "bytes_done": download.bytes_done,
        "percent": round(download.percent, 1),
        "verified_percent": round(download.verify_percent, 1),
        "rate_bytes_per_second": round(download.rate),
        "eta_seconds": download.eta_seconds,
        "transfers": download.transfers,
        "resumes": download.resumes,
        "error": download.error,
        "created_at": _iso(download.created_at),
        "started_at": _iso(download.started_at),
        "finished_at": _iso(download.finished_at),
        # Its job in the engine's one shape (the same for every kind of long work).
        "job": job_dict(download.job) if download.job is not None else None,
    }


def update_facts() -> dict[str, Any]:
    """Everything Updates & Licensing knows, as plain data; upgrades.story.update_status leads
    it with the story (the API and update-control -s read that)."""
    installed = installed_version()
    check = last_check()
    lic = license_view()
    return {
        "installed_version": installed,
        "last_check": (
            {
                "checked_at": _iso(check.checked_at),
                "ok": check.ok,
                "error": check.error,
                "trigger": str(check.trigger),
                "newest_available": check.newest_available or None,
            }
            if check
            else None
        ),
        "offers": [
            {
                "version": view.offer.version,
                "min_version": view.offer.min_version,
                "size": view.offer.size,
                "sha256": view.offer.sha256,
                "url": view.offer.url,
                "release_notes": view.offer.release_notes,
                "downloadable": view.downloadable,
                "status": view.eligibility.label,
            }
            for view in listed_offers(installed)
        ],
        "download": download_dict(active_download() or latest_download(), installed),
        "ready": download_dict(ready_download(installed)),
        "automatic_downloads": update_settings().automatic_downloads,
        "license": {
            "customer": lic.customer,
            "serial": lic.serial,
            "updates_until": _iso(lic.updates_until),
            "valid": lic.valid,
            "entitled": lic.entitled,
            "status": lic.status_label,
            "reason": lic.reason,
        },
    }
