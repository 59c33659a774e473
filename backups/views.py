"""Backup & Restore > System: configuration backups and the system backup image.

Views parse, call one service, and redirect back with a message (or render the comparison).
Changes are for administrators only (the read-only middleware refuses them earlier too). A
passphrase only ever travels in a POST body.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
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


@require_GET
def system(request: HttpRequest) -> HttpResponse:
    """The two sections: configuration backups, and the system backup image."""
    backups, backups_error = selectors.config_backups()
    schedule = selectors.backup_settings()
    context: dict[str, object] = {
        "breadcrumb": "Backup & Restore > System",
        "backups": backups,
        "backups_error": backups_error,
        "trigger_labels": services.TRIGGER_LABELS,
        "create_form": CreateBackupForm(),
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
    return render(request, "backups/system.html", context)


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
        _form_errors(request, form)
        return redirect(PAGE)
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


@require_POST
@administrators_only
def config_delete(request: HttpRequest, name: str) -> HttpResponse:
    """Delete one configuration backup."""
    act(
        request,
        lambda: services.config_backup_delete(user=request.user, name=name),
        BackupError,
        f"Configuration backup {name} deleted.",
    )
    return redirect(PAGE)


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
    act(
        request,
        lambda: system_image.system_backup_start(user=request.user),
        (BackupError, ApplianceError),
        "Creating the system backup image.",
    )
    return redirect(PAGE)


@require_POST
@administrators_only
def system_restore(request: HttpRequest) -> HttpResponse:
    """Restore System Backup: a job returns the system and configuration to the image."""
    act(
        request,
        lambda: system_image.system_restore_start(user=request.user),
        (BackupError, ApplianceError),
        "Restoring the system from the system backup image.",
    )
    return redirect(PAGE)
