"""Rehearse the firmware install: its conversion on a snapshot, as a job of the job engine.

The work itself (snapshot, phases 2 and 4-9 on it, warnings, configuration diff) is
:mod:`appliance.firmware.rehearsal`'s; here it becomes a job of kind ``rehearse``, started from
the Install page, the API or ``update-control --rehearse``.

It is in the appliance's conflict group (jobs.models.APPLIANCE_GROUP): the install refuses to
start while a rehearsal runs and a rehearsal while an install (or a configuration restore, a
system backup) runs, so the snapshot is never taken of a half-changed appliance. It never
blocks mail: nothing enters maintenance, and the mail service is not in that group.

The report is kept in the job's ``details`` (the one table of long work is the truth: no second
store, no file in the appliance root, which stays byte-identical). A worker that dies leaves a
scratch folder behind: its job fails (``on_dead="fail"``: a rehearsal is cheap to start again
and must not run twice unasked), and the recovery registered here removes the folder on the
reconciler's next pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings

from appliance.firmware import rehearsal as appliance_rehearsal
from appliance.firmware.preflight import downtime_estimate_seconds
from appliance.mail import msgstore
from appliance.system import snapshot
from appliance.system.errors import ApplianceError
from events.models import Category
from events.services import User
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import ACTIVE_STATES, APPLIANCE_GROUP, FINAL_STATES, Job, JobState
from upgrades import selectors
from upgrades.models import Download
from upgrades.phase_context import bundle_path

logger = logging.getLogger(__name__)

REHEARSE_KIND = "rehearse"
STOP_POLL_S = 0.5  # how often the work asks the database whether it was cancelled


class RehearsalError(Exception):
    """A rehearsal cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class LastRehearsal:
    """The latest finished rehearsal, as the Install page, the preflight and the CLI show it."""

    job: Job
    report: dict[str, Any]

    @property
    def succeeded(self) -> bool:
        return self.job.state == JobState.SUCCEEDED

    @property
    def finished_at(self) -> datetime | None:
        return self.job.finished_at

    @property
    def downtime_s(self) -> float | None:
        value = self.report.get("downtime_s")
        return float(value) if value is not None else None

    @property
    def warnings(self) -> list[dict[str, str]]:
        return list(self.report.get("warnings", []))

    @property
    def warning_count(self) -> int:
        return sum(1 for w in self.warnings if w.get("level") == "warn")


# --- Starting -----------------------------------------------------------------------------------


def rehearsal_start(*, user: User | None, trigger: str = "console", enqueue: bool = True) -> Job:
    """Queue a rehearsal of the downloaded firmware; RehearsalError when none is ready or the
    appliance is busy (an install, a restore, another rehearsal)."""
    installed = selectors.installed_version()
    download = selectors.ready_download(installed)
    if download is None:
        raise RehearsalError(
            "No verified newer firmware is downloaded: download it under Updates & Licensing, "
            "then rehearse its install."
        )
    if (busy := jobs_engine.active_in(APPLIANCE_GROUP)) is not None:
        who = f", started by {busy.requested_by}" if busy.requested_by else ""
        raise RehearsalError(
            f"{busy.title} is in progress{who}: the rehearsal can start once it has finished."
        )
    try:
        return jobs_engine.start(
            REHEARSE_KIND,
            enqueue_on_commit=enqueue,
            title=f"Rehearsal of the install of firmware {download.version}",
            user=user,
            trigger=trigger,
            conflict_group=APPLIANCE_GROUP,
            steps=appliance_rehearsal.STEPS,
            details={"version": download.version, "download": download.pk},
        )
    except jobs_engine.JobConflict as exc:
        raise RehearsalError(str(exc)) from None


def rehearsal_cancel(*, user: User | None) -> Job:
    """Stop the running rehearsal through the job engine's cancel (the same as every
    cancellable job): a queued one ends at once, a running one stops at its next chunk and
    removes its scratch folder. RehearsalError when none is running."""
    job = rehearsal_active()
    if job is None:
        raise RehearsalError("No rehearsal is running.")
    try:
        return jobs_engine.cancel(job.pk, user=user)
    except jobs_engine.JobError as exc:
        raise RehearsalError(str(exc)) from None


# --- The job ------------------------------------------------------------------------------------


def _stopper(lease: jobs_engine.Lease) -> Any:
    """``should_stop`` for the appliance work: the lease lost, or a cancel asked (looked up at
    most every STOP_POLL_S, as it is asked between every chunk)."""
    last = 0.0
    cancelled = False

    def should_stop() -> bool:
        nonlocal last, cancelled
        if lease.lost.is_set() or cancelled:
            return True
        now = time.monotonic()
        if now - last >= STOP_POLL_S:
            last = now
            cancelled = lease.cancel_requested()
        return cancelled

    return should_stop


def _estimate_now() -> float | None:
    totals = msgstore.totals()
    return downtime_estimate_seconds(totals.bytes, totals.messages) if totals else None


def rehearsal_job_run(lease: jobs_engine.Lease) -> None:
    """The rehearse kind's ``run``: the rehearsal, its report into the job, the outcome."""
    job = lease.job()
    download = Download.objects.filter(pk=job.details.get("download")).first()
    version = str(job.details.get("version", ""))
    if download is None:
        lease.finish(JobState.FAILED, error="the downloaded firmware is gone")
        return

    def progress(step: int, name: str) -> None:
        lease.progress(step=step, steps=appliance_rehearsal.STEPS, step_name=name)

    try:
        report = appliance_rehearsal.rehearse(
            bundle_path(download),
            version,
            progress=progress,
            should_stop=_stopper(lease),
            pause=settings.INSTALL_MIGRATE_PAUSE_MS / 1000,
            yield_ratio=settings.INSTALL_MIGRATE_YIELD_PERCENT / 100,
        )
    except jobs_engine.LeaseLost:
        raise
    except appliance_rehearsal.RehearsalStopped as exc:
        if lease.lost.is_set():
            raise jobs_engine.LeaseLost(str(exc)) from exc
        lease.finish(JobState.CANCELLED, error=str(exc))
        return
    except (ApplianceError, OSError, ValueError) as exc:
        # What the real install would meet: the rehearsal's finding, kept as its report.
        reason = str(exc) or type(exc).__name__
        found = exc.report if isinstance(exc, appliance_rehearsal.RehearsalFailed) else {}
        lease.finish(
            JobState.FAILED,
            error=reason,
            details={"report": {"version": version, "error": reason, **found}},
            message=f"Rehearsal of firmware {version} failed: {reason}",
        )
        return
    report["estimate_s"] = _estimate_now()
    warned = sum(1 for w in report["warnings"] if w["level"] == "warn")
    lease.finish(
        JobState.SUCCEEDED,
        details={"report": report},
        message=(
            f"Rehearsal of firmware {version}: about {report['downtime_s']:.1f} s of downtime "
            f"predicted, {warned} warning{'s' * (warned != 1)}; the live appliance was not touched"
        ),
    )


def scratch_recover() -> list[int]:
    """Reconciler recovery: remove a scratch folder no active rehearsal owns (its worker died).
    Hands no job on, so returns no ids."""
    if Job.objects.filter(kind=REHEARSE_KIND, state__in=ACTIVE_STATES).exists():
        return []
    try:
        if snapshot.snapshot_remove(snapshot.scratch_path()):
            logger.warning("removed the scratch folder of a rehearsal whose worker stopped")
    except (ApplianceError, OSError):
        logger.exception("could not remove a rehearsal's scratch folder")
    return []


def register_job_kind() -> None:
    """The rehearse kind and its scratch recovery (UpgradesConfig.ready)."""
    jobs_registry.register(
        jobs_registry.Kind(
            name=REHEARSE_KIND,
            label="Install rehearsal",
            category=Category.UPDATE,
            run=rehearsal_job_run,
            on_dead="fail",
            cancellable=True,
        )
    )
    jobs_registry.register_recovery("rehearsal-scratch", scratch_recover)


# --- Reading ------------------------------------------------------------------------------------


def rehearsal_active() -> Job | None:
    return Job.objects.filter(kind=REHEARSE_KIND, state__in=ACTIVE_STATES).first()


def last_rehearsal(*, succeeded_only: bool = False) -> LastRehearsal | None:
    """The latest finished rehearsal (or the latest that succeeded), with its report."""
    states = (JobState.SUCCEEDED,) if succeeded_only else FINAL_STATES
    job = (
        Job.objects.filter(kind=REHEARSE_KIND, state__in=states)
        .order_by("-finished_at", "-id")
        .first()
    )
    if job is None:
        return None
    return LastRehearsal(job, dict(job.details.get("report") or {}))


def rehearsal_dict(job: Job) -> dict[str, Any]:
    """A rehearsal job for the CLI's --json and the API: the job and its report."""
    data = jobs_engine.job_dict(job)
    data["report"] = data["details"].get("report")
    data["cancel_requested"] = job.cancel_requested
    return data


def rehearsal_latest() -> Job | None:
    """The running rehearsal, else the latest one (what GET /updates/rehearsal answers)."""
    return rehearsal_active() or Job.objects.filter(kind=REHEARSE_KIND).order_by("-id").first()


def rehearsal_panel() -> dict[str, Any]:
    """What the Install page's rehearsal panel shows: the running one and the last one."""
    return {"active": rehearsal_active(), "last": last_rehearsal()}
