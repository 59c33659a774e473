"""Writes of SMTP > Configuration > Maintenance: maintenance mode on and off, with events.

The SMTP log's retention is saved through mailsecurity.services.retention_apply, which starts
the retention purge when it gets shorter.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from appliance import maintenance
from appliance.maintenance import MaintenanceState
from events.models import Category, Severity
from events.services import event_write, username_of

User = AbstractBaseUser | AnonymousUser | str
DEFAULT_REASON = "Maintenance"


def maintenance_mode_enter(reason: str, *, user: User | None) -> MaintenanceState:
    """Put the appliance into maintenance mode: the mail service answers 421 until it leaves."""
    reason = reason.strip() or DEFAULT_REASON
    state = maintenance.maintenance_enter(reason, by=username_of(user))
    event_write(
        category=Category.SMTP,
        severity=Severity.WARNING,
        message=f"Maintenance mode entered: mail is deferred with 421 ({reason})",
        user=user,
        details={"reason": reason},
    )
    return state


def maintenance_mode_leave(*, user: User | None) -> bool:
    """Leave maintenance mode; True when it was on (an event is written only then)."""
    was_on = maintenance.maintenance_leave()
    if was_on:
        event_write(
            category=Category.SMTP,
            message="Maintenance mode left: mail is accepted again",
            user=user,
        )
    return was_on
