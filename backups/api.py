"""/api/v1/backups: configuration backups and the system backup image as JSON.

The same services as the page; every change needs an administrator. A passphrase travels only
in a request body, never in a URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import FileResponse, HttpRequest
from ninja import File, Router, Schema, Status
from ninja.files import UploadedFile

from api.auth import require_administrator
from api.schemas import Problem
from appliance.config import backupformat, configbackup
from appliance.config.backupformat import (
    BackupError,
    BackupHeader,
    BackupRejected,
    PassphraseRequired,
    WrongPassphrase,
)
from appliance.config.backuprestore import ConfirmationRequired
from backups import selectors, services, system_image
from backups.models import SYSTEM_BACKUP
from jobs import engine as jobs_engine
from jobs.models import Job

router = Router(tags=["backups"])


class BackupOut(Schema):
    name: str
    created_at: str
    firmware_version: str
    config_format: str
    hostname: str
    created_by: str
    comment: str
    trigger: str
    encrypted: bool
    size: int
    verified: bool | None  # made here and unchanged; None: encrypted, known once opened


class CreateIn(Schema):
    comment: str = ""
    passphrase: str | None = None


class PassphraseIn(Schema):
    passphrase: str | None = None


class RestoreIn(Schema):
    passphrase: str | None = None
    # For an unverified backup: every file the restore writes, as the 409 answer listed them.
    confirm_files: list[str] = []


class ConfirmOut(Schema):
    """A restore that cannot go on now: an unverified backup (resend the restore with
    ``confirm_files`` set to ``files``), or another job that changes the appliance is running
    (``files`` empty; ``detail`` names it)."""

    detail: str
    files: list[str] = []


class DiffItemOut(Schema):
    section: str
    name: str
    change: str
    before: str | None
    after: str | None


class RestoreOut(Schema):
    name: str
    files_written: int
    files_removed: int
    stores_updated: int
    converted_from: str | None


class SystemImageOut(Schema):
    present: bool
    firmware_version: str | None
    created_at: str | None
    size: int | None
    sha256: str | None
    error: str


class JobOut(Schema):
    id: int
    kind: str
    state: str
    requested_by: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    bytes_done: int
    bytes_total: int
    percent: float
    error: str
    firmware_version: str


class SystemOut(Schema):
    image: SystemImageOut
    job: JobOut | None


def _backup(header: BackupHeader) -> dict[str, Any]:
    return {
        "name": header.name,
        "created_at": header.created_at.isoformat(),
        "firmware_version": header.firmware_version,
        "config_format": header.config_format,
        "hostname": header.hostname,
        "created_by": header.created_by,
        "comment": header.comment,
        "trigger": header.trigger,
        "encrypted": header.encrypted,
        "size": header.size,
        "verified": header.verified,
    }


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _job(job: Job) -> dict[str, Any]:
    shown = jobs_engine.job_dict(job)
    return {
        "id": job.pk,
        "kind": "create" if job.kind == SYSTEM_BACKUP else "restore",
        "state": job.state,
        "requested_by": job.requested_by,
        "created_at": job.created_at.isoformat(),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "percent": shown["percent"],
        "error": job.error,
        "firmware_version": job.details.get("firmware_version", ""),
    }


def _status(exc: BackupError) -> int:
    """The HTTP status of a refusal."""
    if isinstance(exc, services.BackupNotFound):
        return 404
    if isinstance(exc, PassphraseRequired | WrongPassphrase):
        return 403 if isinstance(exc, WrongPassphrase) else 400
    if isinstance(exc, services.JobInProgress):
        return 409
    if isinstance(exc, BackupRejected | services.BadPassphrase):
        return 422
    return 400


def _refused(exc: BackupError) -> Status:
    return Status(_status(exc), {"detail": str(exc)})


@router.get("/config", response=list[BackupOut])
def config_list(request: HttpRequest) -> list[dict[str, Any]]:
    """The configuration backups, newest first."""
    backups, _ = selectors.config_backups()
    return [_backup(header) for header in backups]


@router.post("/config", response={201: BackupOut, 400: Problem, 422: Problem})
def config_create(request: HttpRequest, payload: CreateIn | None = None):
    """Create a configuration backup (optionally encrypted with the passphrase)."""
    require_administrator(request)
    payload = payload or CreateIn()
    try:
        header = services.config_backup_create(
            user=request.auth,  # type: ignore[attr-defined]
            comment=payload.comment,
            passphrase=payload.passphrase or None,
        )
    except BackupError as exc:
        return _refused(exc)
    return Status(201, _backup(header))


@router.post("/config/upload", response={201: BackupOut, 400: Problem, 422: Problem})
def config_upload(request: HttpRequest, file: File[UploadedFile]):
    """Upload a backup file (multipart, field ``file``); a refused file is not kept."""
    require_administrator(request)
    try:
        header = services.config_backup_upload(
            user=request.auth,  # type: ignore[attr-defined]
            fileobj=file,
            filename=file.name or "",
        )
    except BackupError as exc:
        return _refused(exc)
    return Status(201, _backup(header))


@router.get(
    "/config/{name}/download",
    response={404: Problem},
    openapi_extra={
        "responses": {
            "200": {
                "description": "The backup file, byte for byte.",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        }
    },
)
def config_download(request: HttpRequest, name: str):
    """The backup file, byte for byte."""
    header = selectors.config_backup(name)
    if header is None:
        return Status(404, {"detail": f"There is no configuration backup named {name!r}."})
    path = configbackup.backup_path(header.name)
    return FileResponse(
        path.open("rb"),
        as_attachment=True,
        filename=header.name,
        content_type="application/octet-stream",
    )


@router.post(
    "/config/{name}/diff",
    response={200: list[DiffItemOut], 400: Problem, 403: Problem, 404: Problem, 422: Problem},
)
def config_diff(request: HttpRequest, name: str, payload: PassphraseIn | None = None):
    """What differs between the backup and the running configuration, object by object."""
    passphrase = payload.passphrase if payload is not None else None
    try:
        items = services.config_backup_diff(name=name, passphrase=passphrase or None)
    except BackupError as exc:
        return _refused(exc)
    return [item.__dict__ for item in items]


@router.post(
    "/config/{name}/restore",
    response={
        200: RestoreOut,
        400: Problem,
        403: Problem,
        404: Problem,
        409: ConfirmOut,
        422: Problem,
    },
)
def config_restore(request: HttpRequest, name: str, payload: RestoreIn | None = None):
    """Restore the backup, all or nothing (403 for a wrong passphrase: nothing changed).

    An unverified backup (not made by this appliance, or changed since) answers 409 with the
    files it would write; it is restored when the request names them all in ``confirm_files``.
    """
    require_administrator(request)
    payload = payload or RestoreIn()
    try:
        result = services.config_backup_restore(
            user=request.auth,  # type: ignore[attr-defined]
            name=name,
            passphrase=payload.passphrase or None,
            confirmed=payload.confirm_files[: backupformat.MAX_MEMBERS],
        )
    except ConfirmationRequired as exc:
        return Status(409, {"detail": str(exc), "files": exc.files})
    except BackupError as exc:
        return _refused(exc)
    return {"name": name, **result.__dict__}


@router.delete("/config/{name}", response={204: None, 404: Problem, 400: Problem})
def config_delete(request: HttpRequest, name: str):
    """Delete one configuration backup."""
    require_administrator(request)
    try:
        services.config_backup_delete(user=request.auth, name=name)  # type: ignore[attr-defined]
    except BackupError as exc:
        return _refused(exc)
    return Status(204, None)


def _system() -> dict[str, Any]:
    image = selectors.system_image()
    info = image.info
    job = selectors.active_system_job() or selectors.latest_system_job()
    return {
        "image": {
            "present": info is not None,
            "firmware_version": info.firmware_version if info else None,
            "created_at": info.created_at.isoformat() if info else None,
            "size": info.size if info else None,
            "sha256": info.sha256 if info else None,
            "error": image.error,
        },
        "job": _job(job) if job is not None else None,
    }


@router.get("/system", response=SystemOut)
def system(request: HttpRequest) -> dict[str, Any]:
    """The system backup image on the rescue partition and the latest job."""
    return _system()


def _system_start(request: HttpRequest, start: Callable[..., Job]) -> Status:
    require_administrator(request)
    try:
        job = start(user=request.auth)  # type: ignore[attr-defined]
    except BackupError as exc:
        return _refused(exc)
    return Status(202, _job(job))


@router.post("/system/create", response={202: JobOut, 409: Problem, 400: Problem})
def system_create(request: HttpRequest):
    """Start writing a new system backup image; follow it with GET /system/jobs/{id}."""
    return _system_start(request, system_image.system_backup_start)


@router.post("/system/restore", response={202: JobOut, 409: Problem, 400: Problem})
def system_restore(request: HttpRequest):
    """Start returning the appliance to the system backup image."""
    return _system_start(request, system_image.system_restore_start)


@router.get("/system/jobs/{job_id}", response={200: JobOut, 404: Problem})
def system_job(request: HttpRequest, job_id: int):
    """One system backup job: state, bytes done of total, error."""
    job = selectors.system_job(job_id)
    if job is None:
        return Status(404, {"detail": f"There is no system backup job {job_id}."})
    return _job(job)
