"""Reads of the firmware install: the active and latest runs, one run with its phases.

Writes live in upgrades.install; the page, the API and update-control read through these (and
upgrades.install_status shapes what they show).
"""

from __future__ import annotations

from upgrades.models import (
    FIRMWARE,
    INSTALL_ACTIVE_STATES,
    InstallPhase,
    InstallRun,
    InstallState,
)


def active_install() -> InstallRun | None:
    """The run that is queued, running or rolling back (at most one: a partial unique index)."""
    return InstallRun.objects.filter(component=FIRMWARE, state__in=INSTALL_ACTIVE_STATES).first()


def latest_install() -> InstallRun | None:
    """The newest run, whatever its state."""
    return InstallRun.objects.filter(component=FIRMWARE).first()


def install_get(run_id: int) -> InstallRun | None:
    """One run with its phases prefetched, or None."""
    return InstallRun.objects.filter(pk=run_id).prefetch_related("phases").first()


def install_phases(run: InstallRun) -> list[InstallPhase]:
    """The run's ten phases in order."""
    return list(InstallPhase.objects.filter(run=run).order_by("number"))


def installs_recent(limit: int = 20) -> list[InstallRun]:
    """The latest runs, newest first (the history under the install page)."""
    return list(InstallRun.objects.filter(component=FIRMWARE)[:limit])


def last_succeeded_install() -> InstallRun | None:
    """The newest run that completed (the "Upgrade complete" notice)."""
    return InstallRun.objects.filter(component=FIRMWARE, state=InstallState.SUCCEEDED).first()
