"""The ten phases of the firmware install (Table 1 of the guide), each idempotent.

Each runs in a PhaseContext (upgrades.phase_context) and may be run again from its start by the
next executor after a killed worker; the facts a later phase or the rollback needs are saved in
the run before the change that needs them. upgrades.install runs them in order.
"""

from __future__ import annotations

import logging
import os
import smtplib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.utils import timezone

from appliance.firmware import bundle as appliance_bundle
from appliance.firmware import updatelogs
from appliance.system import maintenance
from appliance.system.errors import ApplianceError
from upgrades.phase_context import (
    PhaseContext,
    PhaseFailed,
    bundle_path,
    log,
    message_count,
)

if TYPE_CHECKING:
    from appliance.config.configbackup import LoadedBackup
    from appliance.system.rescue import SystemBackupInfo

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.005  # how often phase 3 looks for the mail service's "drained"


# --- The ten phases -------------------------------------------------------------------------


def _phase_download(ctx: PhaseContext) -> None:
    """1: the downloaded bundle, verified again (it sat in the spool since the download)."""
    run = ctx.run
    path = bundle_path(run.download)
    ctx.step(f"verifying {path.name}")
    ctx.checkpoint("bundle about to be verified")
    try:
        manifest = appliance_bundle.verify_bundle(path, progress=ctx.callback("bytes"))
    except appliance_bundle.BundleError as exc:
        raise PhaseFailed(f"the downloaded bundle does not verify: {exc}") from exc
    except FileNotFoundError as exc:
        raise PhaseFailed("the downloaded bundle is gone from var/spool/updates") from exc
    if manifest.version != run.version:
        raise PhaseFailed(f"the bundle is firmware {manifest.version}, not {run.version}")
    ctx.progress(manifest.total_size, manifest.total_size, force=True)
    ctx.save_details(
        bundle={
            "file": path.name,
            "version": manifest.version,
            "os_release": manifest.os_release,
            "msgstore_format": manifest.msgstore_format,
            "config_format": manifest.config_format,
            "size": manifest.total_size,
            "payload_sha256": manifest.payload_sha256,
        }
    )


def _phase_install_system(ctx: PhaseContext) -> None:
    """2: the new system into the inactive slot, and the message store's online copy."""
    from appliance.firmware import firmware
    from appliance.mail import msgmigrate

    path = bundle_path(ctx.run.download)
    target = ctx.details.get("new_slot") or firmware.inactive_slot()
    ctx.save_details(new_slot=target)
    ctx.step(f"installing the new system into {target}")
    image = firmware.slot_install(
        path,
        progress=ctx.callback("bytes", f"writing {target}"),
        should_stop=ctx.should_stop,
        rate_limit=settings.INSTALL_RATE_LIMIT or None,
    )
    ctx.check()
    ctx.counts(slot=image.slot, files=image.files, size=image.size)
    ctx.save_details(new_slot=image.slot, image_sha256=image.tree_sha256)
    ctx.checkpoint("new system written, message store copy next")
    prepare_store(ctx, msgmigrate.FORWARD)


def prepare_store(ctx: PhaseContext, direction: Any) -> None:
    """Phase 2's store part, either way: the converted copy built while mail flows."""
    from appliance.mail import msgmigrate

    ctx.step(f"copying the message store to the {direction.target} format while mail flows")
    prepared = ctx.at_low_priority(
        lambda progress, should_stop: msgmigrate.migrate_prepare(
            progress=progress,
            should_stop=should_stop,
            pause=settings.INSTALL_MIGRATE_PAUSE_MS / 1000,
            yield_ratio=settings.INSTALL_MIGRATE_YIELD_PERCENT / 100,
            direction=direction,
        ),
        unit="messages",
        message="copying the message store",
    )
    ctx.check()
    ctx.counts(prepared=_plain(prepared))
    # Everything written so far (the new slot, the new store file) on disk now, while mail
    # still flows: each fsync in the downtime would otherwise wait for it (ext4 commits the
    # data of every file with its journal), seconds for a large store.
    ctx.step("flushing the new system and store file to disk while mail flows")
    began = time.monotonic()
    msgmigrate.checkpoint_passive()  # the store's log into the store, what readers allow
    os.sync()
    ctx.counts(synced_s=round(time.monotonic() - began, 3))


def _phase_shutdown(ctx: PhaseContext) -> None:
    """3: maintenance mode on (SMTP answers 421, beat skips, configuration read-only)."""
    shutdown(ctx)
    from upgrades.validation import validation_before

    validation_before(ctx)  # the validation report's "before": mail stopped, nothing converted


def shutdown(ctx: PhaseContext) -> None:
    """Phase 3 of either direction: the running state recorded for the rollback, maintenance
    on, the mail in flight drained, the message store counted."""
    from appliance.firmware import firmware
    from appliance.mail import msgstore

    run = ctx.run
    if "previous_slot" not in ctx.details:
        # Recorded before the first change of this phase: the rollback needs it.
        level = firmware.firmware_level()
        ctx.save_details(
            previous_slot=firmware.active_slot(),
            from_firmware=level.version or run.from_version,
            from_os_release=level.os_release,
        )
    ctx.step("entering maintenance mode: mail is answered 421 until the services restart")
    state = maintenance.maintenance_enter(
        f"Return to firmware {run.version}"
        if run.is_return
        else f"Firmware upgrade to {run.version}",
        by=run.requested_by or "update",
        holder=f"install:{run.pk}",
    )
    if run.downtime_started_at is None:
        ctx.set_run(downtime_started_at=timezone.now())
    ctx.checkpoint("maintenance on, counting the message store next")
    _drain(ctx, state)
    # A plain count: the content checksums are phase 7's, which compares the old store with
    # the new file chunk by chunk (digests of unchanged chunks computed in phase 2).
    ctx.step("counting the message store")
    messages = message_count(msgstore)
    ctx.set_run(messages_before=messages)
    ctx.counts(messages=messages)


def _drain(ctx: PhaseContext, state: maintenance.MaintenanceState) -> None:
    """Transactions already past MAIL FROM finish their DATA (or are refused at its end): wait
    until the mail service says the last one ended, at most INSTALL_DRAIN_MS (a service that is
    down says nothing; one that is up says it within a few milliseconds when idle)."""
    started = time.monotonic()
    deadline = started + settings.INSTALL_DRAIN_MS / 1000
    while not maintenance.maintenance_drained(state):
        if time.monotonic() >= deadline:
            log(ctx.run, f"drain: no word from the mail service in {settings.INSTALL_DRAIN_MS} ms")
            return
        time.sleep(DRAIN_POLL_S)
    ctx.counts(drained_ms=round((time.monotonic() - started) * 1000))


def _phase_store_backup(ctx: PhaseContext) -> None:
    """4: the message store kept as it is for the rollback (a second name, not a byte copy:
    the conversion never writes the old file, so it is the rollback copy)."""
    from appliance.mail import msgbackup

    dest = updatelogs.install_workdir(ctx.run.pk) / "msgstore-backup.db"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ctx.step(f"keeping the message store for the rollback in var/spool/updates/{dest.parent.name}")
    ctx.checkpoint("message store backup next")
    result = msgbackup.msgstore_backup(dest, progress=ctx.callback("bytes", "copying"))
    backup = _plain(result)
    backup["path"] = str(getattr(result, "path", dest))
    ctx.save_details(store_backup=backup)
    ctx.counts(bytes=backup.get("size"), sha256=backup.get("sha256"))


def _phase_config_backup(ctx: PhaseContext) -> None:
    """5: the configuration in the Backup & Restore format, verified, for an exact revert."""
    from appliance.config import configbackup
    from backups.services import config_backup_before_install

    name = ctx.details.get("config_backup")
    if name:
        try:
            configbackup.backup_load(name)
            updatelogs.install_files_load(ctx.run.pk)
        except (ApplianceError, KeyError, OSError, ValueError):
            name = None  # a half-written or lost backup: take it again
    if not name:
        ctx.step("backing up the configuration")
        ctx.checkpoint("configuration backup next")
        loaded = _unchanged_start_backup(ctx)
        if loaded is None:
            header = config_backup_before_install(user=ctx.run.requested_by or "update")
            loaded = configbackup.backup_load(header.name)  # full validation: every checksum
        name = loaded.header.name
        # The exact 2.8.0 bytes for the rollback: after phase 8 a load of the archive would
        # convert them to the running (2.8.1) format.
        digest = updatelogs.install_files_save(ctx.run.pk, _cpe_files(loaded.files))
        ctx.save_details(config_backup=name, config_files_sha256=digest)
        ctx.counts(backup=name, files=len(loaded.files))


def _unchanged_start_backup(ctx: PhaseContext) -> LoadedBackup | None:
    """The backup taken when the install started, if the configuration is still exactly what
    it holds: one automatic backup per install, unless phases 1-2 saw a change."""
    from appliance.config import backuprestore, configbackup

    name = ctx.details.get("pre_install_backup")
    if not name:
        return None
    try:
        loaded = configbackup.backup_load(name)
        plan = backuprestore.restore_plan(loaded)
    except (ApplianceError, KeyError, OSError, ValueError):
        return None
    return loaded if not plan.writes and not plan.removes else None


def _phase_switch(ctx: PhaseContext) -> None:
    """6: the new system becomes the active one, with its firmware level."""
    from appliance.firmware import firmware

    new_slot = ctx.details["new_slot"]
    ctx.step(f"switching the active system to {new_slot}")
    previous = firmware.slot_switch(new_slot)
    if previous and previous != new_slot and "switched_from" not in ctx.details:
        ctx.save_details(switched_from=previous)
    ctx.checkpoint("active system switched, firmware level next")
    os_release = firmware.slot_os_release(new_slot) or ctx.details.get("bundle", {}).get(
        "os_release"
    )
    firmware.firmware_level_set(ctx.run.version, os_release or None)
    ctx.counts(active=new_slot, firmware=ctx.run.version)


def _phase_migrate(ctx: PhaseContext) -> None:
    """7: the message store in the 2.8.1 format, counts and checksums as before."""
    from appliance.mail import msgmigrate

    migrate_store(ctx, msgmigrate.FORWARD)


def migrate_store(ctx: PhaseContext, direction: Any) -> None:
    """Phase 7 of either direction: the store switched to ``direction.target``, verified."""
    from appliance.mail import msgmigrate

    ctx.step("migrating the message store")
    ctx.checkpoint("message store migration next")
    result = msgmigrate.migrate_finish(
        progress=ctx.callback("messages", "migrating"), direction=direction
    )
    # Compared with a phase 4 byte copy's counts, where one was made (no hard link possible);
    # a kept link is the old store itself, which migrate_finish has just compared.
    counts = result.counts
    before = ctx.details.get("store_backup", {}).get("counts") or {}
    if counts.messages != ctx.run.messages_before:
        raise PhaseFailed(
            f"the migrated message store holds {counts.messages} messages, "
            f"{ctx.run.messages_before} before"
        )
    checksum = getattr(counts, "checksum", None)
    if before.get("checksum") and checksum and checksum != before["checksum"]:
        tables = getattr(counts, "tables", {}) or {}
        differ = sorted(
            name for name, digest in tables.items() if before.get("tables", {}).get(name) != digest
        )
        raise PhaseFailed(
            "the migrated message store's checksum differs from before"
            + (f" (tables: {', '.join(differ)})" if differ else "")
        )
    ctx.counts(migrated=_plain(result), messages=counts.messages)


def _phase_convert(ctx: PhaseContext) -> None:
    """8: the configuration in the 2.8.1 format, $(FILE) files carried over."""
    from appliance.config import configconvert

    ctx.step("converting the configuration")
    ctx.checkpoint("configuration conversion next")
    result = configconvert.config_convert()
    ctx.counts(
        objects=result.objects,
        rules=result.rules,
        settings=result.settings,
        files_carried=len(result.files_carried),
    )


def _phase_cleanup(ctx: PhaseContext) -> None:
    """9: temporary files removed, then the health check before the commit."""
    from appliance.firmware import firmware
    from appliance.mail import msgmigrate

    ctx.step("removing temporary files")
    freed = msgmigrate.migrate_discard() + firmware.staging_cleanup()
    ctx.counts(bytes_freed=int(freed))
    ctx.checkpoint("cleaned up, health check next")
    ctx.step(f"health check: the mail service on {settings.SMTP_HOST}:{settings.SMTP_PORT}")
    health_check(ctx)


def health_check(ctx: PhaseContext) -> None:
    """Services up, a test message accepted and tracked, the message count as before."""
    from appliance.mail import msgstore

    token = maintenance.maintenance_probe_open()
    sender = maintenance.probe_sender(token)
    try:
        try:
            with smtplib.SMTP(
                settings.SMTP_HOST, settings.SMTP_PORT, local_hostname="localhost", timeout=15
            ) as client:
                refused = client.sendmail(
                    sender,
                    ["postmaster@localhost"],
                    f"From: <{sender}>\r\nTo: <postmaster@localhost>\r\n"
                    f"Subject: upgrade health probe\r\n\r\nfirmware {ctx.run.version}\r\n",
                )
        except (OSError, smtplib.SMTPException) as exc:
            raise PhaseFailed(
                f"health check: the mail service on {settings.SMTP_HOST}:{settings.SMTP_PORT} "
                f"did not accept a test message ({exc})"
            ) from exc
        if refused:
            raise PhaseFailed(f"health check: the test message was refused: {refused}")
    finally:
        maintenance.maintenance_probe_close()
    if not _probe_tracked(sender):
        raise PhaseFailed("health check: the test message was accepted but not tracked")
    messages = message_count(msgstore)
    if messages != ctx.run.messages_before:
        raise PhaseFailed(
            f"health check: the message store holds {messages} messages, "
            f"{ctx.run.messages_before} before the upgrade"
        )
    ctx.counts(health="passed", probe=sender)
    log(ctx.run, "health check passed: mail service up, test message tracked, count as before")


def _probe_tracked(sender: str) -> bool:
    """The probe is in Message Tracking, found the way an administrator would search it."""
    from appliance.mail import tracking

    page = tracking.tracking_page(tracking.TrackingFilter(sender=sender), limit=5)
    return bool(page.entries)


def commit_mail_and_backup(ctx: PhaseContext) -> SystemBackupInfo:
    """Phase 10's first half, either way (install or return): mail accepted again, the end
    of the downtime and the message count recorded, a system backup of the running system."""
    from appliance.mail import msgstore
    from appliance.system import rescue

    ctx.step("leaving maintenance mode: mail is accepted again")
    maintenance.maintenance_leave()
    if ctx.run.downtime_ended_at is None:
        ctx.set_run(downtime_ended_at=timezone.now())
    ctx.checkpoint("mail accepted again, system backup next")
    ctx.set_run(messages_after=message_count(msgstore))
    ctx.step("writing a new system backup on the rescue partition")
    return rescue.system_backup_create(progress=ctx.callback("bytes", "system backup"))


def _phase_commit(ctx: PhaseContext) -> None:
    """10: the commit. Mail accepted again, new system backup, the proof and the way back."""
    run = ctx.run
    info = commit_mail_and_backup(ctx)
    from upgrades.validation import validation_write

    ctx.step("writing the validation report")
    validation_write(ctx)  # reads phase 4's kept store: before the work folder goes
    from upgrades.way_back import way_back_keep  # issue 18: Return to the old firmware

    way_back_keep(ctx)  # phase 5's saved files: before the work folder goes
    freed = updatelogs.install_workdir_remove(run.pk)
    ctx.counts(system_backup=info.firmware_version, backup_size=info.size, bytes_freed=freed)


PHASES: dict[int, Callable[[PhaseContext], None]] = {
    1: _phase_download,
    2: _phase_install_system,
    3: _phase_shutdown,
    4: _phase_store_backup,
    5: _phase_config_backup,
    6: _phase_switch,
    7: _phase_migrate,
    8: _phase_convert,
    9: _phase_cleanup,
    10: _phase_commit,
}


def _plain(value: Any) -> dict[str, Any]:
    """A result dataclass as JSON-safe values (for details and counts)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        source = value
    elif hasattr(value, "__dataclass_fields__"):
        source = {name: getattr(value, name) for name in value.__dataclass_fields__}
    else:
        return {"value": str(value)}
    plain: dict[str, Any] = {}
    for key, item in source.items():
        if isinstance(item, bool | int | float | str) or item is None:
            plain[key] = item
        elif hasattr(item, "__dataclass_fields__"):
            plain[key] = _plain(item)
        elif isinstance(item, dict):
            plain[key] = {
                str(k): v if isinstance(v, int | float | str) else str(v) for k, v in item.items()
            }
        elif isinstance(item, list | tuple):
            plain[key] = [str(x) if not isinstance(x, int | float | str) else x for x in item]
        else:
            plain[key] = str(item)
    return plain


def _cpe_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """The configuration XML files of a backup, by their path under the appliance root."""
    chosen: dict[str, bytes] = {}
    for name, data in files.items():
        relative = name.lstrip("/")
        index = relative.find("etc/mailsec/cpe/")
        if index >= 0:
            chosen[relative[index:]] = data
    return chosen
