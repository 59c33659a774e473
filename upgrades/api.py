"""/api/v1/updates: the update status, Check now, Download, Cancel and the install as JSON.

The same services as the page and update-control; every change needs an administrator.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema, Status

from api.auth import require_administrator
from api.schemas import Problem
from upgrades import install, install_status, services
from upgrades.models import CheckTrigger, DownloadTrigger, InstallRun, InstallTrigger
from upgrades.story import update_status

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


class StoryOut(Schema):
    """Where the appliance is in its update life: the sentence every surface leads with."""

    stage: str
    level: str
    installed: str | None
    version: str | None
    headline: str
    percent: float | None
    phase: int | None
    at: str | None
    by: str
    reason: str
    run_id: int | None
    download_id: int | None
    ready_version: str | None


class UpdateStatusOut(Schema):
    story: StoryOut
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
    return update_status()


@router.post("/check", response={200: UpdateStatusOut, 502: Problem})
def check(request: HttpRequest):
    """Check now: ask the update feed what firmware exists (502 when it cannot be read)."""
    require_administrator(request)
    result = services.update_check(trigger=CheckTrigger.API, user=request.auth)  # type: ignore[attr-defined]
    if not result.ok:
        return Status(502, {"detail": result.error})
    return update_status()


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
    return Status(202, update_status())


@router.post("/cancel", response={200: UpdateStatusOut, 409: Problem})
def cancel(request: HttpRequest):
    """Cancel the download in progress (its part file is deleted)."""
    require_administrator(request)
    try:
        services.download_cancel(user=request.auth)  # type: ignore[attr-defined]
    except services.UpdateError as exc:
        return Status(409, {"detail": str(exc)})
    return update_status()


# --- Install (issue 6): preflight, start, follow, abort ------------------------------------


class PreflightCheckOut(Schema):
    key: str
    title: str
    status: str
    value: str
    advice: str
    details: list[str]


class PreflightOut(Schema):
    """The checklist; ``ok`` is false when any check fails (then an install is refused)."""

    ok: bool
    checks: list[PreflightCheckOut]


class PhaseOut(Schema):
    number: int
    name: str
    state: str
    state_label: str
    percent: float
    done: int
    total: int
    unit: str
    message: str
    started_at: str | None
    finished_at: str | None
    elapsed_seconds: float | None
    attempts: int


class InstallRunOut(Schema):
    id: int
    version: str
    from_version: str
    state: str
    state_label: str
    active: bool
    phase: int
    trigger: str
    requested_by: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    elapsed_seconds: float | None
    eta_seconds: int | None
    downtime_seconds: float | None
    abort_requested: bool
    can_abort: bool
    error: str
    messages_before: int | None
    messages_after: int | None
    log_name: str
    phases: list[PhaseOut]


def _install_refusal(exc: Exception) -> Status:
    """409 for "not now" (a failed check, one already running, nothing downloaded), else 400."""
    conflict = (install.PreflightFailed, install.InstallInProgress, install.NothingToInstall)
    return Status(409 if isinstance(exc, conflict) else 400, {"detail": str(exc)})


@router.get("/install/preflight", response=PreflightOut)
def install_preflight(request: HttpRequest) -> dict[str, Any]:
    """The checks an install must pass: each with pass/warn/fail, what was measured, what to do."""
    checks = install.install_preflight(user=request.auth)  # type: ignore[attr-defined]
    return {
        "ok": not any(check.status == "fail" for check in checks),
        "checks": [install_status.check_dict(check) for check in checks],
    }


@router.post("/install", response={202: InstallRunOut, 400: Problem, 409: Problem})
def install_start(request: HttpRequest):
    """Install the downloaded firmware (preflight first: a failed check changes nothing, 409).
    Follow the run with GET /updates/install/{id}."""
    require_administrator(request)

    try:
        run = install.install_start(user=request.auth, trigger=InstallTrigger.API)  # type: ignore[attr-defined]
    except install.InstallError as exc:
        return _install_refusal(exc)
    return Status(202, install_status.run_dict(run))


@router.get("/install/{int:run_id}", response={200: InstallRunOut, 404: Problem})
def install_run(request: HttpRequest, run_id: int):
    """One install run with its ten phases (state, % within the phase, times), elapsed and
    remaining time, who started it and how."""
    run = InstallRun.objects.filter(pk=run_id).first()
    if run is None:
        return Status(404, {"detail": f"There is no install run {run_id}."})
    return install_status.run_dict(run)


@router.post(
    "/install/{int:run_id}/abort", response={200: InstallRunOut, 404: Problem, 409: Problem}
)
def install_abort(request: HttpRequest, run_id: int):
    """Abort the install while it is in phases 1-2 (nothing the appliance uses was touched)."""
    require_administrator(request)
    if not InstallRun.objects.filter(pk=run_id).exists():
        return Status(404, {"detail": f"There is no install run {run_id}."})
    try:
        run = install.install_abort(user=request.auth, run_id=run_id)  # type: ignore[attr-defined]
    except install.InstallError as exc:
        return Status(409, {"detail": str(exc)})
    return install_status.run_dict(run)


@router.post("/install/return", response={202: InstallRunOut, 400: Problem, 409: Problem})
def install_return(request: HttpRequest):
    """Return to the firmware the last upgrade replaced, within its retention period (issue 18):
    409 when no return is possible now (the reason says why) or a check failed. Follow the run
    with GET /updates/install/{id}."""
    require_administrator(request)
    from upgrades import returning

    try:
        run = returning.return_start(user=request.auth, trigger=InstallTrigger.API)  # type: ignore[attr-defined]
    except (returning.NothingToReturn, returning.ReturnRefused, install.InstallInProgress) as exc:
        return Status(409, {"detail": str(exc)})
    except install.InstallError as exc:
        return Status(400, {"detail": str(exc)})
    return Status(202, install_status.run_dict(run))


# --- Install at a time (issue 18): the one pending schedule ---------------------------------


class ScheduleOut(Schema):
    id: int
    version: str
    at: str
    at_local: str
    state: str
    requested_by: str
    created_at: str
    reason: str
    run_id: int | None


class ScheduleIn(Schema):
    """When to install: ISO 8601 with an offset, or "YYYY-MM-DD HH:MM" on the appliance's
    clock. Posted while one is pending, it moves that one."""

    at: str


@router.get("/install/schedule", response={200: ScheduleOut, 404: Problem})
def install_schedule(request: HttpRequest):
    """The pending scheduled install (404 when none is pending)."""
    from upgrades import schedule

    pending = schedule.schedule_pending()
    if pending is None:
        return Status(404, {"detail": "No install is scheduled."})
    return schedule.schedule_dict(pending)


@router.post("/install/schedule", response={201: ScheduleOut, 200: ScheduleOut, 409: Problem})
def install_schedule_set(request: HttpRequest, payload: ScheduleIn):
    """Schedule the install of the downloaded firmware (201), or move the pending one (200);
    409 for a time in the past, nothing downloaded, or an install in progress."""
    require_administrator(request)
    from upgrades import schedule

    user = request.auth  # type: ignore[attr-defined]
    try:
        at = schedule.parse_local(payload.at)
        if schedule.schedule_pending() is not None:
            return schedule.schedule_dict(schedule.schedule_move(at=at, user=user))
        return Status(201, schedule.schedule_dict(schedule.schedule_set(at=at, user=user)))
    except schedule.ScheduleRefused as exc:
        return Status(409, {"detail": str(exc)})


@router.post("/install/schedule/cancel", response={200: ScheduleOut, 409: Problem})
def install_schedule_cancel(request: HttpRequest):
    """Cancel the pending scheduled install (409 when none is pending)."""
    require_administrator(request)
    from upgrades import schedule

    try:
        return schedule.schedule_dict(schedule.schedule_cancel(user=request.auth))  # type: ignore[attr-defined]
    except schedule.ScheduleRefused as exc:
        return Status(409, {"detail": str(exc)})


# --- Rehearse the install on a snapshot (issue 18) ------------------------------------------


class RehearsalOut(Schema):
    """A rehearsal job; ``report`` holds its figures once it has ended (see the Install page)."""

    id: int
    title: str
    state: str
    state_label: str
    step: int
    steps: int
    step_name: str
    percent: float
    requested_by: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str
    cancellable: bool
    cancel_requested: bool
    report: dict[str, Any] | None


@router.get("/rehearsal", response={200: RehearsalOut, 404: Problem})
def rehearsal(request: HttpRequest):
    """The running rehearsal, else the last one with its report (404 when there was none)."""
    from upgrades import rehearsal as rehearsals

    job = rehearsals.rehearsal_latest()
    if job is None:
        return Status(404, {"detail": "No rehearsal has run yet."})
    return rehearsals.rehearsal_dict(job)


@router.post("/rehearsal", response={202: RehearsalOut, 409: Problem})
def rehearsal_start(request: HttpRequest):
    """Rehearse the install of the downloaded firmware on a snapshot (the appliance keeps
    serving mail); 409 when nothing is downloaded or the appliance is busy."""
    require_administrator(request)
    from upgrades import rehearsal as rehearsals

    try:
        job = rehearsals.rehearsal_start(user=request.auth, trigger="api")  # type: ignore[attr-defined]
    except rehearsals.RehearsalError as exc:
        return Status(409, {"detail": str(exc)})
    return Status(202, rehearsals.rehearsal_dict(job))


@router.post("/rehearsal/cancel", response={200: RehearsalOut, 409: Problem})
def rehearsal_cancel(request: HttpRequest):
    """Cancel the running rehearsal (it stops at its next step); 409 when none is running."""
    require_administrator(request)
    from upgrades import rehearsal as rehearsals

    try:
        job = rehearsals.rehearsal_cancel(user=request.auth)  # type: ignore[attr-defined]
    except rehearsals.RehearsalError as exc:
        return Status(409, {"detail": str(exc)})
    return rehearsals.rehearsal_dict(job)
