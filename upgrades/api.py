"""/api/v1/updates: the update status, Check now, Download and Cancel as JSON.

The same services as the page and update-control; every change needs an administrator.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema, Status

from api.auth import require_administrator
from api.schemas import Problem
from upgrades import selectors, services
from upgrades.models import CheckTrigger, DownloadTrigger

router = Router(tags=["updates"])


class CheckOut(Schema):
    checked_at: str | None
    ok: bool
    error: str
    trigger: str
    newest_available: str | None


class OfferOut(Schema):
    version: str
    min_version: str
    size: int
    sha256: str
    url: str
    release_notes: str
    downloadable: bool
    status: str


class DownloadOut(Schema):
    id: int
    version: str
    state: str
    state_label: str
    trigger: str
    requested_by: str
    url: str
    size: int
    sha256: str
    bytes_done: int
    percent: float
    verified_percent: float
    rate_bytes_per_second: int
    eta_seconds: int | None
    transfers: int
    resumes: int
    error: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class LicenseOut(Schema):
    customer: str
    serial: str
    updates_until: str | None
    valid: bool
    entitled: bool
    status: str
    reason: str


class UpdateStatusOut(Schema):
    installed_version: str | None
    last_check: CheckOut | None
    offers: list[OfferOut]
    download: DownloadOut | None
    ready: DownloadOut | None
    automatic_downloads: bool
    license: LicenseOut


class DownloadIn(Schema):
    """Which firmware to download; without a version, the newest that applies."""

    version: str | None = None


# The HTTP status of each refusal of a download.
DOWNLOAD_REFUSALS: dict[type[services.UpdateError], int] = {
    services.DownloadInProgress: 409,
    services.AlreadyReady: 409,
    services.NotEntitled: 403,
    services.InsufficientSpace: 507,
}


@router.get("", response=UpdateStatusOut)
def status(request: HttpRequest) -> dict[str, Any]:
    """Installed firmware, last check, offers, the current download (bytes, %, rate, ETA, state),
    the verified bundle ready to install, automatic downloads, and the license."""
    return selectors.update_status()


@router.post("/check", response={200: UpdateStatusOut, 502: Problem})
def check(request: HttpRequest):
    """Check now: ask the update feed what firmware exists (502 when it cannot be read)."""
    require_administrator(request)
    result = services.update_check(trigger=CheckTrigger.API, user=request.auth)  # type: ignore[attr-defined]
    if not result.ok:
        return Status(502, {"detail": result.error})
    return selectors.update_status()


@router.post(
    "/download",
    response={202: UpdateStatusOut, 400: Problem, 403: Problem, 409: Problem, 507: Problem},
)
def download(request: HttpRequest, payload: DownloadIn | None = None):
    """Start downloading firmware (one download at a time); follow it with GET /updates."""
    require_administrator(request)
    version = payload.version if payload is not None else None
    try:
        services.download_start(
            user=request.auth,  # type: ignore[attr-defined]
            trigger=DownloadTrigger.API,
            version=version or None,
        )
    except services.UpdateError as exc:
        return Status(DOWNLOAD_REFUSALS.get(type(exc), 400), {"detail": str(exc)})
    return Status(202, selectors.update_status())


@router.post("/cancel", response={200: UpdateStatusOut, 409: Problem})
def cancel(request: HttpRequest):
    """Cancel the download in progress (its part file is deleted)."""
    require_administrator(request)
    try:
        services.download_cancel(user=request.auth)  # type: ignore[attr-defined]
    except services.UpdateError as exc:
        return Status(409, {"detail": str(exc)})
    return selectors.update_status()
