"""What the install's page, API and update-control show about a run: plain data, one shape.

The console page, ``GET /api/v1/updates/install/{id}`` and ``update-control -s --json`` must
agree on what a run is doing, so the dictionaries and the time estimate are made here once.
Reads only: the run is changed by upgrades.install.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from statistics import mean
from typing import TYPE_CHECKING, Any

from jobs.engine import job_dict
from upgrades.models import (
    INSTALL_ACTIVE_STATES,
    InstallPhase,
    InstallRun,
    InstallState,
    PhaseState,
)

if TYPE_CHECKING:
    from appliance.firmware.preflight import Check

# Configuration is read-only while the appliance is in maintenance for the install: from service
# shutdown (3) to the end of clean-up (9), and during a rollback.
MAINTENANCE_PHASES = range(3, 10)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def active_run() -> InstallRun | None:
    """The install in progress (queued, running or rolling back), if any: at most one exists."""
    return InstallRun.objects.filter(state__in=INSTALL_ACTIVE_STATES).first()


def latest_run() -> InstallRun | None:
    return InstallRun.objects.first()


def run_phases(run: InstallRun) -> list[InstallPhase]:
    return list(run.phases.order_by("number"))


def holds_maintenance(run: InstallRun | None) -> bool:
    """Whether this run keeps the configuration read-only right now."""
    if run is None or run.state not in INSTALL_ACTIVE_STATES:
        return False
    return run.state == InstallState.ROLLING_BACK or run.phase in MAINTENANCE_PHASES


def run_eta_seconds(run: InstallRun, phases: Sequence[InstallPhase]) -> int | None:
    """Time left, roughly: the running phase at its own pace, each pending phase at the mean
    duration of the phases done so far. None while nothing is known to base it on."""
    if run.state not in (InstallState.QUEUED, InstallState.RUNNING):
        return None
    finished = [
        p.elapsed_seconds
        for p in phases
        if p.state == PhaseState.SUCCEEDED and p.elapsed_seconds is not None
    ]
    typical = mean(finished) if finished else None
    remaining = 0.0
    for phase in phases:
        if phase.state == PhaseState.RUNNING:
            elapsed = phase.elapsed_seconds or 0.0
            if 0 < phase.percent < 100:
                remaining += elapsed * (100 - phase.percent) / phase.percent
            elif typical is not None:
                remaining += max(0.0, typical - elapsed)
            else:
                return None
        elif phase.state == PhaseState.PENDING:
            if typical is None:
                return None
            remaining += typical
    return round(remaining)


def check_dict(check: Check) -> dict[str, Any]:
    return {
        "key": check.key,
        "title": check.title,
        "status": check.status,
        "value": check.value,
        "advice": check.advice,
        "details": list(check.details),
    }


def phase_dict(phase: InstallPhase) -> dict[str, Any]:
    return {
        "number": phase.number,
        "name": phase.name,
        "state": str(phase.state),
        "state_label": phase.get_state_display(),
        "percent": round(phase.percent, 1),
        "done": phase.done,
        "total": phase.total,
        "unit": phase.unit,
        "message": phase.message,
        "started_at": _iso(phase.started_at),
        "finished_at": _iso(phase.finished_at),
        "elapsed_seconds": phase.elapsed_seconds,
        "attempts": phase.attempts,
    }


def run_dict(run: InstallRun) -> dict[str, Any]:
    """The run with its ten phases, as the API and update-control -s --json give it."""
    phases = run_phases(run)
    return {
        "id": run.pk,
        "version": run.version,
        "from_version": run.from_version,
        "state": str(run.state),
        "state_label": run.get_state_display(),
        "active": run.state in INSTALL_ACTIVE_STATES,
        "phase": run.phase,
        "trigger": str(run.trigger),
        "requested_by": run.requested_by,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "elapsed_seconds": run.elapsed_seconds,
        "eta_seconds": run_eta_seconds(run, phases),
        "downtime_seconds": run.downtime_seconds,
        "abort_requested": run.abort_requested,
        "can_abort": run.can_abort,
        "error": run.error,
        "messages_before": run.messages_before,
        "messages_after": run.messages_after,
        "log_name": run.log_name,
        "phases": [phase_dict(phase) for phase in phases],
        # Its job in the engine's one shape (the same for every kind of long work).
        "job": job_dict(run.job) if run.job is not None else None,
    }


def install_summary() -> dict[str, Any] | None:
    """The active run, else the last one, else None (for update-control -s)."""
    run = active_run() or latest_run()
    return run_dict(run) if run is not None else None
