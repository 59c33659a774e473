"""Return to the previous firmware (issue 18): the ten phases of the way back, and what a
successful upgrade keeps for it.

A return is an install run going the other way (``InstallRun.direction``), run by the same job
and the same phase loop as an install (upgrades.install), with the same progress, events,
maintenance and kill-safety; only its phase table is this module's. Where a phase does the same
thing both ways, it is the install's own (phases 3, 4, 5, and the health check of 9):

1. the way back checked: the upgrade's previous slot present, read back whole against its
   manifest and the tree hash recorded at the upgrade's commit, its configuration files intact;
2. the message store converted back to the old format while mail flows (the mail that arrived
   since the upgrade included), exactly as phase 2 converts it forward;
3. maintenance, drain, count (the install's phase 3, recording the slot and firmware level the
   return leaves: what a rollback of a failed return switches back to);
4. and 5. the store and the configuration files of the newer firmware kept for that rollback;
6. the previous slot active again, with its firmware level;
7. the converted store switched in, verified;
8. the previous configuration files put back, byte for byte;
9. clean-up and the health check; 10. the commit: mail accepted, a system backup of the
   returned system, the upgrade marked returned and its kept files released.

The newer firmware's slot is kept (inactive): the same download can be installed again later,
as an ordinary install that finds its image already written.

What an upgrade keeps for it is upgrades.way_back's (the install's phase 10 calls it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from appliance.config.configformat import LEGACY_FILES
from appliance.firmware import updatelogs
from appliance.firmware.slottree import FirmwareError
from upgrades.models import InstallRun
from upgrades.phase_context import PhaseContext, PhaseFailed
from upgrades.phases import (
    PHASES,
    commit_mail_and_backup,
    health_check,
    migrate_store,
    prepare_store,
    shutdown,
)
from upgrades.way_back import (
    RETURN_SLOT_SHA256,
    RETURNED_AT,
    upgrade_of,
    way_back_missing,
)

logger = logging.getLogger(__name__)

# --- The ten phases of a return --------------------------------------------------------------


def _phase_check(ctx: PhaseContext) -> None:
    """1: the way back intact: the previous system read back whole, its configuration files."""
    from appliance.firmware import firmware

    run = ctx.run
    upgrade = upgrade_of(run)
    ctx.step("checking the way back: the previous system and its configuration")
    ctx.checkpoint("way back about to be checked")
    if (missing := way_back_missing(upgrade)) is not None:
        raise PhaseFailed(f"the way back to {run.version} is not intact: {missing}")
    running = firmware.firmware_level().version
    if running != run.from_version:
        raise PhaseFailed(f"the appliance runs firmware {running}, not {run.from_version}")
    slot = ctx.details["return_slot"]
    ctx.step(f"reading the previous system in {slot} back against its manifest")
    try:
        image = firmware.slot_verify(
            slot,
            progress=ctx.callback("bytes", f"reading {slot}"),
            should_stop=ctx.should_stop,
            rate_limit=settings.INSTALL_RATE_LIMIT or None,
        )
    except FirmwareError as exc:
        raise PhaseFailed(f"the previous system in {slot} does not verify: {exc}") from exc
    ctx.check()
    if image.tree_sha256 != upgrade.details.get(RETURN_SLOT_SHA256):
        raise PhaseFailed(f"the previous system in {slot} is not the one the upgrade left")
    files, _digest = updatelogs.return_files_load(upgrade.pk)
    if not any(name in files for name in LEGACY_FILES):
        raise PhaseFailed("the kept configuration holds none of the previous firmware's files")
    ctx.counts(slot=slot, files=image.files, size=image.size, config_files=len(files))


def _phase_prepare_back(ctx: PhaseContext) -> None:
    """2: the message store converted back beside the live one, while mail flows."""
    from appliance.mail import msgmigrate

    ctx.checkpoint("message store conversion back next")
    prepare_store(ctx, msgmigrate.BACK)


def _phase_switch_back(ctx: PhaseContext) -> None:
    """6: the previous system becomes the active one again, with its firmware level."""
    from appliance.firmware import firmware

    slot = ctx.details["return_slot"]
    ctx.step(f"switching the active system back to {slot}")
    ctx.checkpoint("previous system about to be switched to")
    firmware.slot_switch(slot)
    ctx.checkpoint("active system switched, firmware level next")
    os_release = ctx.details.get("return_os_release") or firmware.slot_os_release(slot)
    firmware.firmware_level_set(ctx.run.version, os_release or None)
    ctx.counts(active=slot, firmware=ctx.run.version)


def _phase_migrate_back(ctx: PhaseContext) -> None:
    """7: the message store in the previous format, counts and checksums as before."""
    from appliance.mail import msgmigrate

    migrate_store(ctx, msgmigrate.BACK)


def _phase_config_back(ctx: PhaseContext) -> None:
    """8: the previous configuration files put back exactly, the newer file removed."""
    from appliance.config import configconvert

    ctx.step(f"putting back the configuration of firmware {ctx.run.version}")
    ctx.checkpoint("configuration about to be put back")
    files, _digest = updatelogs.return_files_load(int(ctx.details["returns_run"]))
    configconvert.config_revert(files)
    ctx.counts(files=len(files), format=configconvert.config_format())


def _phase_cleanup_back(ctx: PhaseContext) -> None:
    """9: what either conversion left removed, then the health check before the commit."""
    from appliance.firmware import firmware
    from appliance.mail import msgmigrate

    ctx.step("removing temporary files")
    freed = (
        msgmigrate.migrate_discard(direction=msgmigrate.BACK)
        + msgmigrate.migrate_discard(direction=msgmigrate.FORWARD)
        + firmware.staging_cleanup()
    )
    ctx.counts(bytes_freed=int(freed))
    ctx.checkpoint("cleaned up, health check next")
    ctx.step(f"health check: the mail service on {settings.SMTP_HOST}:{settings.SMTP_PORT}")
    health_check(ctx)


def _phase_commit_back(ctx: PhaseContext) -> None:
    """10: the commit. Mail accepted again, a system backup of the returned system, the
    upgrade marked returned and its kept configuration released (the newer slot stays)."""
    run = ctx.run
    info = commit_mail_and_backup(ctx)
    upgrade_id = int(ctx.details["returns_run"])
    _mark_returned(upgrade_id, run)
    freed = updatelogs.return_files_remove(upgrade_id) + updatelogs.install_workdir_remove(run.pk)
    ctx.counts(system_backup=info.firmware_version, backup_size=info.size, bytes_freed=freed)


def _mark_returned(upgrade_id: int, run: InstallRun) -> None:
    """The upgrade's details say it was returned from, when and by which run (once)."""
    with transaction.atomic():
        upgrade = InstallRun.objects.select_for_update().filter(pk=upgrade_id).first()
        if upgrade is None or upgrade.details.get(RETURNED_AT):
            return
        details = {
            **upgrade.details,
            RETURNED_AT: timezone.now().isoformat(),
            "returned_by_run": run.pk,
        }
        InstallRun.objects.filter(pk=upgrade_id).update(details=details)


RETURN_PHASES: dict[int, Callable[[PhaseContext], None]] = {
    1: _phase_check,
    2: _phase_prepare_back,
    3: shutdown,
    4: PHASES[4],  # the store kept as it is (the newer format) for a rollback
    5: PHASES[5],  # the configuration backed up, its files kept for a rollback
    6: _phase_switch_back,
    7: _phase_migrate_back,
    8: _phase_config_back,
    9: _phase_cleanup_back,
    10: _phase_commit_back,
}
