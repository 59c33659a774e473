"""What a successful upgrade keeps for its Return to the previous firmware (issue 18).

At its commit (phase 10, :func:`way_back_keep`) an upgrade moves phase 5's configuration files
out of the work folder before it goes and records, in the run's details, the tree hash of the
slot it left and ``return_until``, the end of the retention period (LMI_UPGRADE_RETURN_DAYS).
upgrades.returning releases both when the period is over; upgrades.return_phases uses them.

Apart from the return's phases because the install's own phase 10 calls it: the return's
phases build on the install's, never the other way.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from appliance.firmware import updatelogs
from appliance.firmware.slottree import FirmwareError
from appliance.system.errors import ApplianceError
from upgrades.models import InstallRun
from upgrades.phase_context import PhaseContext, PhaseFailed, log

logger = logging.getLogger(__name__)

# Keys of an upgrade run's details about its way back.
RETURN_UNTIL = "return_until"
RETURN_UNAVAILABLE = "return_unavailable"
RETURN_FILES_SHA256 = "return_files_sha256"
RETURN_SLOT_SHA256 = "return_slot_sha256"
RETURNED_AT = "returned_at"
RELEASED_AT = "released_at"


# --- What the upgrade keeps ----------------------------------------------------------------------


def way_back_keep(ctx: PhaseContext) -> None:
    """Phase 10 of an upgrade: keep its way back until the retention period ends.

    Never fails the commit: a way back that cannot be kept (a full disk) is recorded as
    unavailable, with the reason, and the upgrade completes all the same. A rerun after the
    facts were recorded does nothing.
    """
    from appliance.firmware import firmware

    run = ctx.run
    if run.is_return or RETURN_UNTIL in ctx.details or RETURN_UNAVAILABLE in ctx.details:
        return
    slot = ctx.details.get("previous_slot")
    try:
        digest = updatelogs.return_files_keep(run.pk)
        image = firmware.slot_image(slot) if slot else None
        if image is None:
            raise FirmwareError(f"the previous system ({slot}) is not a complete slot")
    except (ApplianceError, OSError, ValueError) as exc:
        logger.exception("install %s: the way back could not be kept", run.pk)
        ctx.save_details(**{RETURN_UNAVAILABLE: f"it could not be kept: {exc}"})
        log(run, f"the way back to {run.from_version} could not be kept: {exc}")
        return
    until = timezone.now() + timedelta(days=settings.UPGRADE_RETURN_DAYS)
    ctx.save_details(
        **{
            RETURN_UNTIL: until.isoformat(),
            RETURN_FILES_SHA256: digest,
            RETURN_SLOT_SHA256: image.tree_sha256,
        }
    )
    ctx.counts(return_until=until.isoformat())
    log(
        run, f"the way back to {run.from_version} ({slot}) is kept until {until:%Y-%m-%d %H:%M} UTC"
    )


def return_until(upgrade: InstallRun) -> datetime | None:
    """When the upgrade's way back is released (None: it kept none)."""
    text = (upgrade.details or {}).get(RETURN_UNTIL)
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def way_back_missing(upgrade: InstallRun) -> str | None:
    """Why the upgrade's way back is not there any more, or None when every kept part is
    present and as recorded (without reading the slot's files: phase 1 does that)."""
    from appliance.firmware import firmware

    details = upgrade.details or {}
    if RETURN_UNTIL not in details:
        return (
            f"the upgrade kept no way back: {details[RETURN_UNAVAILABLE]}"
            if RETURN_UNAVAILABLE in details
            else "the upgrade kept no way back (it was installed before returns were possible)"
        )
    if details.get(RETURNED_AT):
        return "the appliance has already returned from this upgrade"
    if details.get(RELEASED_AT):
        return f"the way back was released on {details[RELEASED_AT][:16].replace('T', ' ')} UTC"
    slot = str(details.get("previous_slot") or "")
    try:
        if not slot or slot == firmware.active_slot():
            return f"the previous system ({slot or 'unknown'}) is the one running"
        image = firmware.slot_image(slot)
    except (ApplianceError, ValueError) as exc:
        return f"the previous system cannot be read: {exc}"
    if image is None:
        return f"the previous system ({slot}) is gone"
    if image.tree_sha256 != details.get(RETURN_SLOT_SHA256):
        return f"the previous system ({slot}) was replaced since the upgrade"
    try:
        _files, digest = updatelogs.return_files_load(upgrade.pk)
    except FileNotFoundError:
        return "the previous configuration kept for the way back is gone"
    except (ApplianceError, OSError) as exc:
        return f"the previous configuration kept for the way back cannot be read: {exc}"
    if digest != details.get(RETURN_FILES_SHA256):
        return "the previous configuration kept for the way back was changed since the upgrade"
    return None


def upgrade_of(run: InstallRun) -> InstallRun:
    """The upgrade run a return undoes."""
    upgrade = InstallRun.objects.filter(pk=run.details.get("returns_run")).first()
    if upgrade is None:
        raise PhaseFailed("the upgrade this return undoes is no longer recorded")
    return upgrade
