"""Writes of SMTP > Configuration > Maintenance: maintenance mode on and off and the relay
networks, with events.

The SMTP log's retention is saved through mailsecurity.services.retention_apply, which starts
the retention purge when it gets shorter.
"""

from __future__ import annotations

import contextlib
import dataclasses

from appliance.config.smtp import SmtpSettings
from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system import maintenance
from appliance.system.maintenance import MaintenanceState
from events.models import Category, Severity
from events.services import User, event_write, username_of

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


def relay_networks_set(networks: list[str], *, user: User | None) -> SmtpSettings:
    """Replace the networks whose clients may relay mail to any domain.

    The mail service reads them with the policy before the next message (no restart). The
    settings validate every network before anything is written; an event is written only when
    they changed.
    """
    current = read_smtp_settings()
    updated = dataclasses.replace(current, relay_networks=" ".join(networks))
    wanted = updated.relay_network_list()
    # A value on disk that is refused (written by hand, say) is replaced, not compared.
    with contextlib.suppress(ValueError):
        if wanted == current.relay_network_list():
            return current
    write_smtp_settings(updated)
    event_write(
        category=Category.SMTP,
        severity=Severity.WARNING,
        message=(
            f"Relay networks set to {', '.join(networks)}: their clients may relay to any domain"
            if networks
            else "Relay networks cleared: mail is accepted for the local domains only"
        ),
        user=user,
        details={"before": current.relay_networks.split(), "after": networks},
    )
    return updated
