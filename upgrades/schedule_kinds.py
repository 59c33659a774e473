"""What a scheduled install starts (its kind), the one pending schedule, and superseding it.

Below upgrades.schedule, which sets, moves, cancels and starts schedules and so imports the
install service (it starts the built-in kind). Whatever starts work now instead of at the
scheduled time supersedes the pending schedule: the install of this appliance
(upgrades.install) and the cluster's rolling upgrade (cluster.rolling). They do it here, with
the one way a schedule is superseded, so the install never imports the service that starts it.

The kinds are registered at start-up (``register_kind`` in an app's ``ready``; the built-in
install kind by upgrades.schedule, which ``UpgradesConfig.ready`` imports).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db.models import Q
from django.utils import timezone

from events.services import User, username_of
from upgrades.models import FIRMWARE, ScheduledInstall, ScheduleState
from upgrades.phase_context import event


class ScheduleRefused(Exception):
    """A schedule request that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class ScheduleKind:
    """What a schedule starts when it is due, registered by the app that knows how.

    A kind says what it would install now (``version``, or ScheduleRefused why not: the page
    shows that reason instead of the form), starts it at the due moment (``start`` links what
    it started with a conditional update on the started row and returns it for the event; a
    ScheduleRefused means nothing was installed anywhere) and, for a claim a dead worker left,
    links what was started after the claim (``settle``, False when nothing was). A kind other
    than the built-in install keeps its own row beside the schedule: ``attach`` writes it in
    the schedule's transaction, ``members`` selects its schedules and ``linked`` those whose
    start is recorded there instead of in ``ScheduledInstall.run``.
    """

    name: str
    noun: str  # "install", in "the worker stopped while starting the install"
    title: str  # "Install of firmware {version}"
    page: str  # the URL name of the page whose "#schedule" section offers it
    version: Callable[[], str]
    start: Callable[[ScheduledInstall], dict[str, object]]
    settle: Callable[[ScheduledInstall], bool]
    attach: Callable[[ScheduledInstall], object] | None = None
    members: Q | None = None
    linked: Q | None = None


INSTALL = "install"
_KINDS: dict[str, ScheduleKind] = {}


def register_kind(kind: ScheduleKind) -> None:
    """Make ``kind`` schedulable (an app's ``ready``); registering it again replaces it."""
    _KINDS[kind.name] = kind


def registered_kinds() -> list[ScheduleKind]:
    """Every kind registered, the built-in install included."""
    return list(_KINDS.values())


def kind_named(name: str) -> ScheduleKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ScheduleRefused(f"{name!r} is not something that can be scheduled.") from None


def kind_of(schedule: ScheduledInstall) -> ScheduleKind:
    """The kind a schedule starts: the registered kind whose row it has, else the install."""
    for kind in _KINDS.values():
        if (
            kind.members is not None
            and ScheduledInstall.objects.filter(kind.members, pk=schedule.pk).exists()
        ):
            return kind
    return _KINDS[INSTALL]


def schedule_title(schedule: ScheduledInstall) -> str:
    """ "Install of firmware 2.8.1.0", "Rolling upgrade of the cluster to 2.8.1.0"."""
    return kind_of(schedule).title.format(version=schedule.version)


def lowered_title(schedule: ScheduledInstall) -> str:
    """The title inside a sentence: "Scheduled install of firmware 2.8.1.0 moved ..."."""
    title = schedule_title(schedule)
    return title[:1].lower() + title[1:]


def schedule_pending() -> ScheduledInstall | None:
    """The one pending schedule, if any."""
    return ScheduledInstall.objects.filter(component=FIRMWARE, state=ScheduleState.PENDING).first()


def schedule_supersede(*, reason: str, user: User | None, **details: Any) -> None:
    """What was started now replaces the schedule pending for later (pending -> cancelled):
    left pending, it would only be refused at its time, with a warning about nothing.
    ``details`` go into the event beside the schedule (what was started instead)."""
    pending = schedule_pending()
    if pending is None:
        return
    cancelled = ScheduledInstall.objects.filter(pk=pending.pk, state=ScheduleState.PENDING).update(
        state=ScheduleState.CANCELLED,
        reason=reason,
        changed_at=timezone.now(),
        changed_by=username_of(user),
    )
    if cancelled:
        event(
            f"Scheduled {lowered_title(pending)} cancelled: {reason}",
            user=user,
            schedule=pending.pk,
            **details,
        )
