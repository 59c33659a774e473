"""Install at a time (issue 18): set, move and cancel the one pending schedule, and start it.

An administrator picks a moment (the console suggests the quietest hour of the last seven
days); beat's ``upgrades.tasks.install_schedule_due`` runs :func:`schedule_due` every minute,
which claims the due schedule by a conditional update (two beats, or a beat and its retry, never
start two installs) and starts the install through the one install service, so the preflight
runs again at that very moment. If anything refuses then (a failed check, another install,
the bundle gone or replaced), nothing is installed: the schedule ends ``refused`` with the reason,
an event says why, and Home shows it as a notice.

What a schedule starts is its kind (:class:`ScheduleKind`, upgrades.schedule_kinds): the install
of this appliance, built in, or any kind another app registers at start-up (the cluster app's
rolling upgrade of Central and its members, cluster.schedule), so this module never imports that
app. The claim, the refusal and the settling of a claim a dead worker left are written once here,
for every kind; superseding the pending schedule is in upgrades.schedule_kinds, below the
install service that supersedes it.

Every state change is a conditional update on the state it leaves (see ``ScheduleState``).
"Now" is ``django.utils.timezone.now`` (the one clock tests move); times are shown and typed in
the appliance's time zone (``TIME_ZONE``), stored in UTC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as day_time

from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from appliance.mail import processing
from appliance.system.errors import ApplianceError
from events.models import Severity
from events.services import User, username_of
from lmi.notices import Notice
from upgrades import install, selectors
from upgrades.models import (
    FIRMWARE,
    INSTALL_ACTIVE_STATES,
    InstallRun,
    InstallTrigger,
    ScheduledInstall,
    ScheduleState,
)
from upgrades.phase_context import event
from upgrades.schedule_kinds import (
    INSTALL,
    ScheduleKind,
    ScheduleRefused,
    kind_named,
    kind_of,
    lowered_title,
    register_kind,
    registered_kinds,
    schedule_pending,
    schedule_title,
)

logger = logging.getLogger(__name__)

# The typed formats: the page's datetime-local input, and update-control's --at.
INPUT_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S")
# A schedule claimed whose outcome was never written (its worker died between the claim and
# the install's start) is settled by a later beat after this long.
CLAIM_GRACE = timedelta(minutes=10)
# How long Home tells that a scheduled install did not start.
REFUSAL_SHOWN = timedelta(days=1)
QUIET_DAYS = 7


# --- Reading (what a schedule starts, and the pending one: upgrades.schedule_kinds) -------------


def schedule_page(schedule: ScheduledInstall) -> str:
    """The page section that shows and changes the schedule."""
    return reverse(kind_of(schedule).page) + "#schedule"


def schedule_latest() -> ScheduledInstall | None:
    return ScheduledInstall.objects.filter(component=FIRMWARE).first()


def local_text(moment: datetime) -> str:
    """A moment as the appliance's clock shows it: ``2026-03-01 03:00 UTC``."""
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M %Z").strip()


def input_value(moment: datetime) -> str:
    """A moment as a datetime-local input's value, in the appliance's time zone."""
    return timezone.localtime(moment).strftime("%Y-%m-%dT%H:%M")


def parse_local(text: str) -> datetime:
    """A typed time (``YYYY-MM-DD HH:MM``, or ISO with an offset) as an aware moment; a time
    without an offset is on the appliance's clock."""
    text = (text or "").strip()
    for fmt in INPUT_FORMATS:
        try:
            naive = datetime.strptime(text, fmt)  # naive: made aware on the appliance clock below
        except ValueError:
            continue
        return timezone.make_aware(naive)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ScheduleRefused(
            f"{text!r} is not a time: give it as YYYY-MM-DD HH:MM "
            f"({timezone.get_current_timezone_name()})."
        ) from None
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment)


def schedule_dict(schedule: ScheduledInstall | None) -> dict[str, object] | None:
    """The schedule as JSON (the API, ``update-control -s --json``)."""
    if schedule is None:
        return None
    return {
        "id": schedule.pk,
        "kind": kind_of(schedule).name,
        "title": schedule_title(schedule),
        "version": schedule.version,
        "at": schedule.at.isoformat(),
        "at_local": local_text(schedule.at),
        "state": schedule.state,
        "requested_by": schedule.requested_by,
        "created_at": schedule.created_at.isoformat(),
        "reason": schedule.reason,
        "run_id": schedule.run_id,
    }


# --- Set, move, cancel --------------------------------------------------------------------------


def _checked_time(at: datetime) -> datetime:
    if timezone.is_naive(at):
        at = timezone.make_aware(at)
    now = timezone.now()
    if at <= now:
        raise ScheduleRefused(
            f"{local_text(at)} is in the past (it is {local_text(now)} now): pick a later time."
        )
    return at


def _version_to_install() -> str:
    """The verified bundle an install would use now; refused when there is none, or an install
    runs (scheduling waits for nothing)."""
    if InstallRun.objects.filter(component=FIRMWARE, state__in=INSTALL_ACTIVE_STATES).exists():
        raise ScheduleRefused("A firmware install is in progress: schedule the next one after it.")
    download = selectors.ready_download(selectors.installed_version())
    if download is None:
        raise ScheduleRefused(
            "No verified newer firmware is downloaded: download it under Updates & Licensing "
            "before scheduling its install."
        )
    return download.version


def schedule_set(*, at: datetime, user: User | None, kind: str = INSTALL) -> ScheduledInstall:
    """Schedule the install of the downloaded firmware at ``at`` (one pending at a time,
    whatever its kind): of this appliance, or what another registered ``kind`` starts."""
    at = _checked_time(at)
    chosen = kind_named(kind)
    version = chosen.version()
    who = username_of(user)
    try:
        with transaction.atomic():  # a savepoint: a caller's transaction survives the refusal
            schedule = ScheduledInstall.objects.create(version=version, at=at, requested_by=who)
            if chosen.attach is not None:
                chosen.attach(schedule)
    except IntegrityError:
        pending = schedule_pending()
        when = f" for {local_text(pending.at)}" if pending is not None else ""
        raise ScheduleRefused(
            f"An install is already scheduled{when}: move or cancel it instead."
        ) from None
    event(
        f"{chosen.title.format(version=version)} scheduled for {local_text(at)}",
        user=user,
        schedule=schedule.pk,
        kind=chosen.name,
        version=version,
        at=at.isoformat(),
    )
    return schedule


def schedule_move(*, at: datetime, user: User | None) -> ScheduledInstall:
    """Move the pending schedule to another time."""
    at = _checked_time(at)
    pending = schedule_pending()
    if pending is None:
        raise ScheduleRefused("No install is scheduled: there is nothing to move.")
    moved = ScheduledInstall.objects.filter(pk=pending.pk, state=ScheduleState.PENDING).update(
        at=at, changed_at=timezone.now(), changed_by=username_of(user)
    )
    if not moved:
        raise ScheduleRefused("The scheduled install has just started or was cancelled.")
    event(
        f"Scheduled {lowered_title(pending)} moved from {local_text(pending.at)} "
        f"to {local_text(at)}",
        user=user,
        schedule=pending.pk,
        version=pending.version,
        at=at.isoformat(),
    )
    pending.refresh_from_db()
    return pending


def schedule_cancel(*, user: User | None) -> ScheduledInstall:
    """Cancel the pending schedule; nothing is installed."""
    pending = schedule_pending()
    if pending is None:
        raise ScheduleRefused("No install is scheduled: there is nothing to cancel.")
    cancelled = ScheduledInstall.objects.filter(pk=pending.pk, state=ScheduleState.PENDING).update(
        state=ScheduleState.CANCELLED, changed_at=timezone.now(), changed_by=username_of(user)
    )
    if not cancelled:
        raise ScheduleRefused(
            "The scheduled install has just started: it can no longer be cancelled."
        )
    event(
        f"Scheduled {lowered_title(pending)} at {local_text(pending.at)} cancelled",
        user=user,
        schedule=pending.pk,
        version=pending.version,
    )
    pending.refresh_from_db()
    return pending


# --- Beat: start what is due ----------------------------------------------------------------------


def _refuse(schedule: ScheduledInstall, reason: str) -> None:
    """started -> refused: nothing was installed; the event and Home's notice say why (one
    transaction: whoever sees the refusal sees its event)."""
    with transaction.atomic():
        refused = ScheduledInstall.objects.filter(
            pk=schedule.pk, state=ScheduleState.STARTED, run__isnull=True
        ).update(state=ScheduleState.REFUSED, reason=reason, changed_at=timezone.now())
        if not refused:
            return
        event(
            f"Scheduled {lowered_title(schedule)} at {local_text(schedule.at)} did "
            f"not start, nothing was installed: {reason}",
            severity=Severity.WARNING,
            schedule=schedule.pk,
            version=schedule.version,
            reason=reason,
        )


def _settle_orphans(now: datetime) -> None:
    """A claim whose outcome was never written (the worker died between the claim and the
    start): link what it started, or refuse it."""
    stale = ScheduledInstall.objects.filter(
        state=ScheduleState.STARTED, run__isnull=True, changed_at__lt=now - CLAIM_GRACE
    )
    for kind in registered_kinds():
        if kind.linked is not None:
            stale = stale.exclude(kind.linked)
    for schedule in stale:
        kind = kind_of(schedule)
        if not kind.settle(schedule):
            _refuse(schedule, f"the worker stopped while starting the {kind.noun}")


def schedule_due(*, now: datetime | None = None) -> ScheduledInstall | None:
    """Beat, every minute: start the pending schedule once its time has come.

    The claim (pending -> started) is one conditional update: whoever gets the row count 1
    starts it, any other beat finds nothing to do. Its kind starts it through its own service,
    whose checks run again at that moment (the install's preflight; for a rolling upgrade also
    the members' reachability); when anything refuses, the schedule ends refused and nothing is
    installed. Returns the schedule this call handled, or None.
    """
    now = now or timezone.now()
    _settle_orphans(now)
    due = ScheduledInstall.objects.filter(
        component=FIRMWARE, state=ScheduleState.PENDING, at__lte=now
    ).first()
    if due is None:
        return None
    claimed = ScheduledInstall.objects.filter(
        pk=due.pk, state=ScheduleState.PENDING, at__lte=now
    ).update(state=ScheduleState.STARTED, changed_at=timezone.now())
    if not claimed:
        return None  # another beat (or a move, or a cancel) got there first
    due.refresh_from_db()
    kind = kind_of(due)
    try:
        started = kind.start(due)
    except ScheduleRefused as exc:
        _refuse(due, str(exc))
    except Exception as exc:
        logger.exception("scheduled %s %s could not start", kind.noun, due.pk)
        _refuse(due, f"the {kind.noun} could not start: {exc}")
    else:
        event(
            f"Scheduled {lowered_title(due)} at {local_text(due.at)} started",
            schedule=due.pk,
            version=due.version,
            **started,
        )
    due.refresh_from_db()
    return due


# --- The built-in kind: this appliance's install -----------------------------------------------


def _install_start(due: ScheduledInstall) -> dict[str, object]:
    """Install the scheduled firmware on this appliance, preflight included."""
    try:
        ready = selectors.ready_download(selectors.installed_version())
        if ready is not None and ready.version != due.version:
            raise ScheduleRefused(
                f"firmware {ready.version} is the one downloaded now, not the scheduled "
                f"{due.version}: schedule it again"
            )
        run = install.install_start(user=due.requested_by or None, trigger=InstallTrigger.SCHEDULE)
    except (install.InstallError, ApplianceError, OSError) as exc:
        raise ScheduleRefused(str(exc)) from exc
    ScheduledInstall.objects.filter(
        pk=due.pk, state=ScheduleState.STARTED, run__isnull=True
    ).update(run=run)
    return {"run": run.pk}


def _install_settle(schedule: ScheduledInstall) -> bool:
    """Link the scheduled install a dead worker started after the claim, if any."""
    run = InstallRun.objects.filter(
        trigger=InstallTrigger.SCHEDULE, created_at__gte=schedule.changed_at
    ).last()
    if run is None:
        return False
    ScheduledInstall.objects.filter(pk=schedule.pk, run__isnull=True).update(run=run)
    return True


register_kind(
    ScheduleKind(
        name=INSTALL,
        noun="install",
        title="Install of firmware {version}",
        page="upgrades:install",
        version=_version_to_install,
        start=_install_start,
        settle=_install_settle,
    )
)


# --- The quietest hour ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuietHour:
    """The hour of day with the least mail over the last days, and when it next comes."""

    hour: int  # 0-23 on the appliance's clock
    at: datetime  # its next start after now
    per_hour: float  # messages received per hour at that hour, on average
    days: int

    @property
    def label(self) -> str:
        return f"{self.hour:02d}:00-{(self.hour + 1) % 24:02d}:00"


def _next_start(hour: int, now: datetime) -> datetime:
    local_now = timezone.localtime(now)
    for offset in (0, 1, 2):
        naive = datetime.combine(local_now.date() + timedelta(days=offset), day_time(hour))
        moment = timezone.make_aware(naive)
        if moment > now:
            return moment
    raise AssertionError("an hour of day always comes within two days")


def quietest_hour(*, now: datetime | None = None, days: int = QUIET_DAYS) -> QuietHour | None:
    """From the processing figures of the last ``days`` whole days of hours: the hour of day
    (appliance's clock) with the fewest messages received per hour, and its next start.

    An hour that saw no mail counts as zero; between equally quiet hours the soonest wins. None
    when the store holds no figures for the period (nothing to base a suggestion on) or cannot
    be read.
    """
    now = now or timezone.now()
    until = int(now.timestamp()) // 3600 * 3600
    since = until - days * 24 * 3600
    try:
        buckets = processing.series(since, until, 3600)
    except (ApplianceError, OSError):
        return None
    if not buckets:
        return None
    received = dict.fromkeys(range(24), 0)
    seen = dict.fromkeys(range(24), 0)
    for start in range(since, until, 3600):
        seen[timezone.localtime(datetime.fromtimestamp(start, UTC)).hour] += 1
    for bucket in buckets:
        received[timezone.localtime(datetime.fromtimestamp(bucket.start, UTC)).hour] += (
            bucket.received
        )
    rate = {hour: received[hour] / seen[hour] for hour in range(24) if seen[hour]}
    least = min(rate.values())
    hour = min(
        (h for h, value in rate.items() if value == least), key=lambda h: _next_start(h, now)
    )
    return QuietHour(hour=hour, at=_next_start(hour, now), per_hour=least, days=days)


# --- What Home and every page show ----------------------------------------------------------------


def schedule_notices(notices: list[Notice], *, story_stage: str) -> list[Notice]:
    """Home's update notices with the schedule: "Install of X scheduled for T" in place of
    "ready to install" (one stage, never stacked), or why a scheduled install did not start."""
    pending = schedule_pending()
    if pending is not None:
        notice = Notice(
            "info",
            f"{schedule_title(pending)} scheduled for {local_text(pending.at)}"
            + (f" by {pending.requested_by}." if pending.requested_by else "."),
            "Move or cancel",
            schedule_page(pending),
        )
        if story_stage == "downloaded" and notices:
            return [notice, *notices[1:]]
        return [*notices, notice]
    latest = schedule_latest()
    if (
        latest is not None
        and latest.state == ScheduleState.REFUSED
        and latest.changed_at is not None
        and latest.changed_at > timezone.now() - REFUSAL_SHOWN
        and not InstallRun.objects.filter(created_at__gt=latest.changed_at).exists()
    ):
        notices.append(
            Notice(
                "warning",
                f"The {lowered_title(latest)} scheduled for "
                f"{local_text(latest.at)} did not start, nothing was installed: {latest.reason}",
                "Schedule again",
                schedule_page(latest),
            )
        )
    return notices


def schedule_banner() -> dict[str, object] | None:
    """The pending schedule as every page's banner shows it (what, when, who, where to change
    it), or None."""
    pending = schedule_pending()
    if pending is None:
        return None
    return {
        "title": schedule_title(pending),
        "at": pending.at,
        "requested_by": pending.requested_by,
        "url": schedule_page(pending),
    }
