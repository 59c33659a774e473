"""Return to the previous firmware (issue 18): whether it is possible, its checks and start, the
release of the way back when its period is over, and what the story and Home say about it.

A successful upgrade keeps its way back (upgrades.way_back.way_back_keep) for
LMI_UPGRADE_RETURN_DAYS days: the slot it left and the configuration files of the firmware it
replaced. Until then "Return to <that firmware>" runs the ten phases of a return, as an install
run of its own (``direction="return"``) on the install's one job engine, so the one-run-at-a-
time rule, the progress page, the banner, maintenance's read-only configuration and the
reconciler's resume all apply unchanged. When the period is over, beat's hourly
:func:`return_release_due` removes the old slot and the kept files and gives the space back; a
day before, Home's notice turns into a warning.

Reads and writes of the appliance go through appliance.firmware (slots, kept files); the run
itself through upgrades.install.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psutil
from django.db import transaction
from django.utils import timezone

from appliance.firmware import firmware, updatelogs
from appliance.firmware.preflight import FAIL, PASS, Check, downtime_text, human_bytes
from appliance.system.errors import ApplianceError
from appliance.system.paths import layout
from events.models import Severity
from events.services import User, username_of
from jobs import engine as jobs_engine
from jobs.models import APPLIANCE_GROUP
from upgrades import install, install_selectors, selectors
from upgrades.models import (
    FIRMWARE,
    INSTALL_ACTIVE_STATES,
    InstallDirection,
    InstallRun,
    InstallState,
    InstallTrigger,
)
from upgrades.phase_context import event, log
from upgrades.story import when
from upgrades.way_back import (
    RELEASED_AT,
    RETURN_SLOT_SHA256,
    RETURNED_AT,
    return_until,
    way_back_missing,
)

# Home's notice becomes a warning this long before the way back is released.
RELEASE_WARNING = timedelta(days=1)


class NothingToReturn(install.InstallError):
    """No upgrade can be returned from now; the message says why."""


class ReturnRefused(install.InstallError):
    """A check of the return failed: nothing was changed."""


# --- Is there a way back? -------------------------------------------------------------------------


@dataclass(frozen=True)
class WayBack:
    """The latest successful upgrade and whether the appliance can return from it now.

    ``upgrade`` is None when the latest successful run is not an upgrade (there was none, or
    the appliance already returned); ``reason`` says why a return is not possible ('' when it
    is).
    """

    upgrade: InstallRun | None
    until: datetime | None
    reason: str

    @property
    def available(self) -> bool:
        return self.upgrade is not None and not self.reason

    @property
    def target(self) -> str:
        """The firmware a return goes back to."""
        return self.upgrade.from_version if self.upgrade is not None else ""

    @property
    def current(self) -> str:
        return self.upgrade.version if self.upgrade is not None else ""

    @property
    def until_text(self) -> str:
        return when(self.until)


def return_available(now: datetime | None = None) -> WayBack:
    """The latest successful upgrade, if the appliance runs it, within its period, with every
    kept part present; otherwise the reason (reads only)."""
    now = now or timezone.now()
    latest = (
        InstallRun.objects.filter(component=FIRMWARE, state=InstallState.SUCCEEDED)
        .order_by("-finished_at", "-pk")
        .first()
    )
    if latest is None or latest.is_return:
        return WayBack(None, None, "there is no upgrade to return from")
    until = return_until(latest)
    missing = way_back_missing(latest)
    if missing is not None:
        return WayBack(latest, until, missing)
    if until is not None and until <= now:
        return WayBack(latest, until, f"its retention period ended on {when(until)}")
    installed = selectors.installed_version()
    if installed != latest.version:
        return WayBack(
            latest, until, f"the appliance runs firmware {installed}, not {latest.version}"
        )
    return WayBack(latest, until, "")


def _store_bytes_back() -> int:
    """Room the old-format store file takes beside the live one: the store as it is on disk
    plus the bodies it holds compressed, uncompressed (what the older format stores)."""
    from appliance.mail import msgstore

    totals = msgstore.totals()
    on_disk = totals.bytes if totals is not None else 0
    try:
        raw = sum(store.bytes for store in msgstore.list_stores())
    except (ApplianceError, OSError, ValueError):
        raw = 2 * on_disk
    return on_disk + raw


def return_preflight(way: WayBack) -> list[Check]:
    """The checks a return must pass: the way back, the space for the converted store, and
    what the downtime will be (the install's, measured). Reads only."""
    checks = [
        Check(
            "way-back",
            "The way back",
            PASS if way.available else FAIL,
            (
                f"firmware {way.target} kept in {way.upgrade.details.get('previous_slot')} "
                f"until {way.until_text}"
                if way.available and way.upgrade is not None
                else way.reason
            ),
            ""
            if way.available
            else "A return is possible only within the retention period "
            "after a successful upgrade, with its kept system and configuration in place.",
        )
    ]
    if not way.available:
        return checks
    directory = layout().msgstore_dir
    needed = _store_bytes_back()
    usage = install.PREFLIGHT_DISK_USAGE or psutil.disk_usage
    try:
        free = int(usage(str(directory if directory.is_dir() else layout().root)).free)
    except OSError as exc:
        checks.append(Check("space-for-return", "Space for the return", FAIL, str(exc), ""))
        free = None
    if free is not None:
        fits = needed <= free
        checks.append(
            Check(
                "space-for-return",
                "Space for the return",
                PASS if fits else FAIL,
                f"needs {human_bytes(needed)}, {human_bytes(free)} free",
                ""
                if fits
                else f"{human_bytes(needed - free)} short on the message store's "
                "disk: lower retention and purge, then try again.",
                (f"the message store converted back beside the live one, in {directory}",),
            )
        )
    seconds = way.upgrade.downtime_seconds if way.upgrade is not None else None
    checks.append(
        Check(
            "downtime",
            "Expected downtime",
            PASS,
            downtime_text(seconds) if seconds is not None else "about the install's",
            "Mail is answered with 421 (try again later) from the service shutdown until the "
            "services restart, as during the install; sending servers retry.",
        )
    )
    return checks


# --- Start -------------------------------------------------------------------------------------


def return_start(
    *, user: User | None, trigger: InstallTrigger | str = InstallTrigger.CONSOLE
) -> InstallRun:
    """Check, back up the configuration, create the return's run and ten phases, enqueue it.

    Refused (an :class:`install.InstallError`, nothing changed) while any install or appliance
    job runs, outside the retention period, with a kept part missing, or when a check fails.
    """
    if (active := install_selectors.active_install()) is not None:
        raise install._in_progress(active)
    if (busy := jobs_engine.active_in(APPLIANCE_GROUP)) is not None:
        raise install.InstallInProgress(f"{busy.title} is in progress: the return can start "
                                        "once it has finished.")  # fmt: skip
    way = return_available()
    if not way.available or way.upgrade is None:
        target = f" to firmware {way.target}" if way.target else ""
        raise NothingToReturn(f"A return{target} is not possible: {way.reason}.")
    upgrade = way.upgrade
    checks = return_preflight(way)
    failed = [check for check in checks if check.status == FAIL]
    if failed:
        event(
            f"Return to firmware {way.target} refused by its checks",
            severity=Severity.WARNING,
            user=user,
            failed=[c.key for c in failed],
        )
        reasons = "; ".join(f"{c.title}: {c.value} ({c.advice})" for c in failed)
        raise ReturnRefused(f"The return cannot start, nothing was changed. {reasons}")
    header = install.backup_before_start(user=user, what="return")
    with transaction.atomic():
        run = install.run_create(
            InstallRun(
                direction=InstallDirection.RETURN,
                download=upgrade.download,
                version=upgrade.from_version,
                from_version=upgrade.version,
                requested_by=username_of(user),
                trigger=str(trigger),
                details={
                    "returns_run": upgrade.pk,
                    "return_slot": upgrade.details["previous_slot"],
                    "return_os_release": upgrade.details.get("from_os_release"),
                    "pre_install_backup": header.name,
                    "preflight": {c.key: c.status for c in checks},
                },
            ),
            user,
        )
        event(
            f"Return to firmware {run.version} started (from {run.from_version}, undoing the "
            f"upgrade of {when(upgrade.finished_at)})",
            user=user,
            run=run.pk,
            version=run.version,
            returns_run=upgrade.pk,
            trigger=run.trigger,
            backup=header.name,
        )
    log(
        run,
        f"return to firmware {run.version} from {run.from_version} started by "
        f"{run.requested_by or 'the system'} ({run.trigger}), undoing install run {upgrade.pk}; "
        f"configuration backup {header.name}",
    )
    for check in checks:
        log(run, f"preflight {check.key}: {check.status}: {check.value}")
    return run


# --- Release after the period -----------------------------------------------------------------


def return_release_due(now: datetime | None = None) -> list[int]:
    """Beat, hourly: release the way back of every upgrade past its period; the runs released.

    Waits while any install, return or appliance job runs (a return may be using the slot).
    The old slot is removed only if it is still the one the upgrade left (its tree hash) and
    not running; the kept files always go.
    """
    now = now or timezone.now()
    if InstallRun.objects.filter(state__in=INSTALL_ACTIVE_STATES).exists():
        return []
    if jobs_engine.active_in(APPLIANCE_GROUP) is not None:
        return []
    released = []
    upgrades = InstallRun.objects.filter(
        component=FIRMWARE, state=InstallState.SUCCEEDED, direction=InstallDirection.UPGRADE
    )
    for upgrade in upgrades:
        details = upgrade.details or {}
        until = return_until(upgrade)
        if until is None or until > now or details.get(RELEASED_AT) or details.get(RETURNED_AT):
            continue
        _release(upgrade, now)
        released.append(upgrade.pk)
    return released


def _release(upgrade: InstallRun, now: datetime) -> None:
    details = upgrade.details
    slot = str(details.get("previous_slot") or "")
    freed, removed, kept_because = 0, "", ""
    try:
        image = firmware.slot_image(slot) if slot else None
        if image is None:
            kept_because = "it was gone already"
        elif slot == firmware.active_slot():
            kept_because = "it is the running system"
        elif image.tree_sha256 != details.get(RETURN_SLOT_SHA256):
            kept_because = "it holds another system now"
        else:
            freed += firmware.slot_remove(slot)
            removed = slot
    except (ApplianceError, OSError, ValueError) as exc:
        kept_because = f"it could not be removed: {exc}"
    freed += updatelogs.return_files_remove(upgrade.pk)
    with transaction.atomic():
        current = InstallRun.objects.select_for_update().get(pk=upgrade.pk)
        current.details = {
            **current.details,
            RELEASED_AT: now.isoformat(),
            "released_bytes": freed,
            "released_slot": removed,
        }
        InstallRun.objects.filter(pk=upgrade.pk).update(details=current.details)
        event(
            f"The way back to firmware {upgrade.from_version} was released after its retention "
            f"period: {human_bytes(freed)} freed"
            + (f" (the previous system in {removed} removed)" if removed else "")
            + (f"; the slot {slot} was kept: {kept_because}" if kept_because and slot else ""),
            run=upgrade.pk,
            bytes_freed=freed,
            slot=removed,
        )


# --- The story and Home ---------------------------------------------------------------------------
