"""Backup & Restore > System: configuration backups and the system backup image.

Views parse, call one service, and redirect back with a message (or render the comparison).
Changes are for administrators only (the read-only middleware refuses them earlier too). What
cannot be undone (delete, restore) has a confirmation page first: GET says what will happen,
POST does it. A passphrase only ever travels in a POST body.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.contrib import messages
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.template.defaultfilters import date as date_filter
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.roles import READ_ONLY_REFUSAL, is_administrator
from appliance.config import backupformat, configbackup
from appliance.config.backupformat import BackupError, BackupHeader, PassphraseRequired
from appliance.config.backuprestore import ConfirmationRequired
from appliance.system.errors import ApplianceError
from backups import selectors, services, system_image
from backups.forms import CreateBackupForm, PassphraseForm, ScheduleForm, UploadBackupForm
from lmi.actions import act, administrators_only

PAGE = "backups:system"
# Error reports (a 500 mailed to the admins) must not carry a passphrase.
hides_passphrases = sensitive_post_parameters("passphrase", "passphrase_again")


def _form_errors(request: HttpRequest, form: Any) -> None:
    for errors in form.errors.values():
        for error in errors:
            messages.error(request, error)


def _system_context() -> dict[str, object]:
    active = selectors.active_system_job()
    return {
        "image": selectors.system_image(),
        "job": active or selectors.latest_system_job(),
        "job_active": active is not None,
    }


def _page(
    request: HttpRequest, create_form: CreateBackupForm | None = None, status: int = 200
) -> HttpResponse:
    """The page; ``create_form`` is a refused create form, shown again with what was typed."""
    backups, backups_error = selectors.config_backups()
    schedule = selectors.backup_settings()
    context: dict[str, object] = {
        "breadcrumb": "Backup & Restore > System",
        "backups": backups,
        "backups_error": backups_error,
        "trigger_labels": services.TRIGGER_LABELS,
        "create_form": create_form or CreateBackupForm(),
        "upload_form": UploadBackupForm(),
        "schedule": schedule,
        "schedule_form": ScheduleForm(
            initial={
                "scheduled_enabled": schedule.scheduled_enabled,
                "scheduled_hour": schedule.scheduled_hour,
                "keep_last": schedule.keep_last,
            }
        ),
        "max_upload": configbackup.MAX_BACKUP_BYTES,
        **_system_context(),
    }
    return render(request, "backups/system.html", context, status=status)


@require_GET
def system(request: HttpRequest) -> HttpResponse:
    """The two sections: configuration backups, and the system backup image."""
    return _page(request)


@never_cache
@require_GET
def system_partial(request: HttpRequest) -> HttpResponse:
    """The system backup panel alone; htmx polls it while a job is queued or running."""
    return render(request, "backups/_system_panel.html", _system_context())


def _download(header: BackupHeader) -> HttpResponse:
    try:
        path = configbackup.backup_path(header.name)
    except (KeyError, ValueError) as exc:
        raise Http404("No such configuration backup.") from exc
    response = FileResponse(
        path.open("rb"),
        as_attachment=True,
        filename=header.name,
        content_type="application/octet-stream",
    )
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def config_download(request: HttpRequest, name: str) -> HttpResponse:
    """The backup file as it is on the appliance (encrypted ones stay encrypted)."""
    header = selectors.config_backup(name)
    if header is None:
        raise Http404("No such configuration backup.")
    return _download(header)


@hides_passphrases
@require_POST
@administrators_only
def config_create(request: HttpRequest) -> HttpResponse:
    """Create: a backup of the running configuration, with a comment and an optional passphrase."""
    form = CreateBackupForm(request.POST)
    if not form.is_valid():
        # The page again with the comment kept and the reason by the field (the passphrases are
        # not sent back: a password field is never filled in from the server).
        return _page(request, create_form=form, status=400)
    act(
        request,
        lambda: services.config_backup_create(
            user=request.user,
            comment=form.cleaned_data["comment"],
            passphrase=form.cleaned_data["passphrase"] or None,
        ),
        BackupError,
        lambda header: (
            f"Configuration backup {header.name} created"
            f"{' (encrypted)' if header.encrypted else ''}."
        ),
    )
    return redirect(PAGE)


@require_POST
@administrators_only
def config_create_download(request: HttpRequest) -> HttpResponse:
    """The guide's advice in one click: make a configuration backup and download it."""
    try:
        header = services.config_backup_create(
            user=request.user, comment="Downloaded before a system change"
        )
    except BackupError as exc:
        messages.error(request, str(exc))
        return redirect(PAGE)
    return _download(header)


@require_POST
@administrators_only
def config_upload(request: HttpRequest) -> HttpResponse:
    """Upload: keep a backup file, or refuse it with the reason (nothing kept)."""
    form = UploadBackupForm(request.POST, request.FILES)
    if not form.is_valid():
        _form_errors(request, form)
        return redirect(PAGE)
    upload = form.cleaned_data["backup_file"]
    try:
        header = services.config_backup_upload(
            user=request.user, fileobj=upload, filename=upload.name or ""
        )
    except BackupError as exc:
        messages.error(request, f"The file was refused: {exc}")
    else:
        messages.success(request, f"Configuration backup {header.name} uploaded.")
    return redirect(PAGE)


def _header_or_404(name: str) -> BackupHeader:
    header = selectors.config_backup(name)
    if header is None:
        raise Http404("No such configuration backup.")
    return header


def _compare_context(
    request: HttpRequest, header: BackupHeader, passphrase: str | None
) -> dict[str, object]:
    """The differences, or the reason they cannot be shown (ask the passphrase again)."""
    context: dict[str, object] = {"header": header, "passphrase_form": PassphraseForm()}
    if header.encrypted and not passphrase:
        context["needs_passphrase"] = True
        return context
    try:
        preview = services.config_backup_preview(name=header.name, passphrase=passphrase)
    except PassphraseRequired as exc:
        context.update(needs_passphrase=True, compare_error=str(exc))
    except BackupError as exc:
        context.update(needs_passphrase=header.encrypted, compare_error=str(exc))
    else:
        context.update(
            compared=True,
            sections=selectors.diff_sections(preview.items),
            changes=len(preview.items),
            verified=preview.verified,
            writes=preview.writes,
            removes=preview.removes,
        )
    return context


def _confirmed(request: HttpRequest) -> list[str]:
    """The files the administrator saw listed, when the box confirming them was ticked."""
    if request.POST.get("confirm_unverified") != "yes":
        return []
    return request.POST.getlist("confirm_file")[: backupformat.MAX_MEMBERS]


def _passphrase(request: HttpRequest) -> str | None:
    form = PassphraseForm(request.POST)
    return (form.cleaned_data.get("passphrase") or None) if form.is_valid() else None


@hides_passphrases
@require_http_methods(["GET", "POST"])
def config_compare(request: HttpRequest, name: str) -> HttpResponse:
    """Compare: object by object, what differs between the backup and the running configuration.

    Encrypted backups ask the passphrase (POST, never in the URL).
    """
    header = _header_or_404(name)
    passphrase = _passphrase(request) if request.method == "POST" else None
    context = _compare_context(request, header, passphrase)
    context["breadcrumb"] = "Backup & Restore > System > Compare"
    return render(request, "backups/compare.html", context)


@hides_passphrases
@require_http_methods(["GET", "POST"])
def config_restore(request: HttpRequest, name: str) -> HttpResponse:
    """Restore: a confirmation page with the differences; POST action=restore restores."""
    header = _header_or_404(name)
    if request.method == "POST":
        if not is_administrator(request.user):
            return HttpResponseForbidden(READ_ONLY_REFUSAL)
        passphrase = _passphrase(request)
        if request.POST.get("action") == "restore":
            try:
                result = services.config_backup_restore(
                    user=request.user,
                    name=name,
                    passphrase=passphrase,
                    confirmed=_confirmed(request),
                )
            except ConfirmationRequired as exc:
                messages.error(request, f"The backup was not restored, nothing changed: {exc}")
                context = _compare_context(request, header, passphrase)
            except BackupError as exc:
                messages.error(request, f"The backup was not restored, nothing changed: {exc}")
                context = _compare_context(request, header, None)
            else:
                messages.success(
                    request,
                    f"Configuration backup {name} restored: {result.files_written} files "
                    f"written, {result.files_removed} removed.",
                )
                return redirect(PAGE)
        else:
            context = _compare_context(request, header, passphrase)
    else:
        context = _compare_context(request, header, None)
    context["breadcrumb"] = "Backup & Restore > System > Restore"
    return render(request, "backups/restore.html", context)


def _when(moment: datetime) -> str:
    return date_filter(
        timezone.localtime(moment) if timezone.is_aware(moment) else moment, "Y-m-d H:i"
    )


@require_http_methods(["GET", "POST"])
def config_delete(request: HttpRequest, name: str) -> HttpResponse:
    """Delete: GET is the confirmation (what is lost), POST deletes the backup file."""
    if request.method == "POST":
        if not is_administrator(request.user):
            return HttpResponseForbidden(READ_ONLY_REFUSAL)
        act(
            request,
            lambda: services.config_backup_delete(user=request.user, name=name),
            BackupError,
            f"Configuration backup {name} deleted.",
        )
        return redirect(PAGE)
    header = _header_or_404(name)
    facts = [
        ("Backup", header.name),
        ("Created", f"{_when(header.created_at)} by {header.created_by}"),
        ("Firmware", header.firmware_version),
        ("Comment", header.comment or "—"),
        ("Encrypted", "Yes" if header.encrypted else "No"),
    ]
    confirm = {
        "title": f"Delete configuration backup {header.name}",
        "facts": facts,
        "consequences": [
            "The backup file is deleted from the appliance; it cannot be restored or "
            "downloaded afterwards.",
            "Copies downloaded earlier are not affected. Download it first if you may need it.",
            "The running configuration does not change.",
        ],
        "action": reverse("backups:config_delete", args=[header.name]),
        "button": "Delete backup",
        "testid": "delete-confirm",
        "back": reverse(PAGE),
        "back_label": "Back to Backup & Restore",
        "admin_does": "deletes configuration backups.",
    }
    return render(
        request,
        "_confirm.html",
        {"breadcrumb": "Backup & Restore > System > Delete", "confirm": confirm},
    )


@require_POST
@administrators_only
def schedule(request: HttpRequest) -> HttpResponse:
    """Scheduled backups: daily on or off, the hour, how many to keep."""
    form = ScheduleForm(request.POST)
    if not form.is_valid():
        _form_errors(request, form)
        return redirect(PAGE)
    try:
        row = services.backup_settings_set(user=request.user, **form.cleaned_data)
    except BackupError as exc:
        messages.error(request, str(exc))
    else:
        state = (
            f"daily at {row.scheduled_hour:02d}:00, keeping the last {row.keep_last}"
            if row.scheduled_enabled
            else "off"
        )
        messages.success(request, f"Scheduled configuration backups: {state}.")
    return redirect(PAGE)


@require_POST
@administrators_only
def system_create(request: HttpRequest) -> HttpResponse:
    """Create System Backup: a job writes a new image onto the rescue partition."""
    return _system_job_start(
        request, system_image.system_backup_start, "Creating the system backup image."
    )


def _system_job_start(
    request: HttpRequest, start: Callable[..., object], started: str
) -> HttpResponse:
    """Create and Restore System Backup: start the job, say it started or why it did not."""
    act(request, lambda: start(user=request.user), (BackupError, ApplianceError), started)
    return redirect(PAGE)


@require_http_methods(["GET", "POST"])
def system_restore(request: HttpRequest) -> HttpResponse:
    """Restore System Backup: GET is the confirmation (what returns, what is lost), POST starts
    the job that returns the system and configuration to the image."""
    if request.method == "POST":
        if not is_administrator(request.user):
            return HttpResponseForbidden(READ_ONLY_REFUSAL)
        return _system_job_start(
            request,
            system_image.system_restore_start,
            "Restoring the system from the system backup image.",
        )
    image = selectors.system_image()
    info = image.info
    confirm: dict[str, object] = {
        "title": "Restore the system backup image",
        "back": reverse(PAGE),
        "back_label": "Back to Backup & Restore",
        "admin_does": "restores the system backup image.",
        "action": reverse("backups:system_restore"),
        "button": "Restore System Backup",
        "testid": "system-restore-confirm",
    }
    if info is None:
        confirm["consequences"] = []
        confirm["refusal"] = image.error or (
            "There is no system backup image on the rescue partition: create one first."
        )
    else:
        confirm["facts"] = [
            ("Firmware", info.firmware_version),
            ("Created", _when(info.created_at)),
            ("Size", filesizeformat(info.size)),
        ]
        confirm["consequences"] = [
            f"The system and its configuration return to the image of firmware "
            f"{info.firmware_version} made {_when(info.created_at)}.",
            "Configuration changes made since the image was made are lost: download a "
            "configuration backup first to keep them.",
            "The message store is kept.",
        ]
        if selectors.active_system_job() is not None:
            confirm["refusal"] = "A system backup or restore is already in progress."
    return render(
        request,
        "_confirm.html",
        {"breadcrumb": "Backup & Restore > System > Restore System Backup", "confirm": confirm},
    )
