"""Writes of Backup & Restore > System for the system backup image: its jobs on the engine.

Jobs of the engine (jobs/): one at a time with every job that changes the appliance. A job
whose worker died is started again from scratch: a creation writes the new image beside the
current one and switches one pointer (appliance.system.rescue), so the previous image stays
current until the new one is whole, and what a dead writer left is swept first; a restore
finishes or discards its journal first. Refusals and events go the way backups.services says.
"""

from __future__ import annotations

import logging

from django.template.defaultfilters import filesizeformat

from appliance.system import rescue
from appliance.system.errors import ApplianceError
from backups.models import (
    SYSTEM_BACKUP,
    SYSTEM_RESTORE,
)
from backups.services import JobInProgress, NoSystemBackup, refuse
from events.models import Category
from events.services import User
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import APPLIANCE_GROUP, Job, JobState

logger = logging.getLogger(__name__)


def _system_job_start(kind: str, title: str, user: User | None) -> Job:
    try:
        return jobs_engine.start(kind, title=title, user=user, conflict_group=APPLIANCE_GROUP)
    except jobs_engine.JobConflict as exc:
        raise JobInProgress(str(exc)) from None


def system_backup_start(*, user: User | None) -> Job:
    """Queue the creation of a new system backup image (it replaces the one there is)."""
    return _system_job_start(SYSTEM_BACKUP, "System backup", user)


def system_restore_start(*, user: User | None) -> Job:
    """Queue the return of the appliance to the system backup image on the rescue partition."""
    try:
        info = rescue.system_backup_info()
    except ApplianceError as exc:
        raise NoSystemBackup(f"The system backup image cannot be read: {exc}") from exc
    if info is None:
        raise NoSystemBackup(
            "There is no system backup image on the rescue partition: create one first."
        )
    try:
        rescue.system_backup_check()  # what an appliance needs is in it, before any job
    except ApplianceError as exc:
        refuse(
            exc,
            f"System restore refused: {exc}",
            user=user,
            error=NoSystemBackup,
            refusal=str(exc),
            firmware_version=info.firmware_version,
        )
    return _system_job_start(SYSTEM_RESTORE, "System restore", user)


def system_job_run(lease: jobs_engine.Lease) -> None:
    """Create or restore the image for one job (the engine claimed it and keeps it alive).

    First removes what creations cut short left on the rescue partition (a job started again
    after its worker died finds its own), under the partition's lock.
    """
    creating = lease.kind == SYSTEM_BACKUP
    lease.progress(step=0, steps=2, step_name="Preparing")
    leftovers = rescue.system_backup_leftovers_remove()
    if leftovers:
        logger.info("removed from the rescue partition: %s", ", ".join(leftovers))
    writing = (
        "Writing the image to the rescue partition"
        if creating
        else "Restoring the system from the image"
    )

    def progress(done: int, total: int) -> None:
        # Step 1 starts with the first file written (the kill tests pause there, mid-image).
        step, name = (1, writing) if done else (0, "Preparing")
        lease.progress(step=step, step_name=name, bytes_done=done, bytes_total=total)

    if creating:
        info = rescue.system_backup_create(progress=progress)
    else:
        info = rescue.system_backup_restore(progress=progress)
    what = (
        f"System backup created: firmware {info.firmware_version}, {filesizeformat(info.size)}"
        if creating
        else f"System restored from the system backup image of firmware {info.firmware_version}"
        f" made {info.created_at:%Y-%m-%d %H:%M} UTC"
    )
    if leftovers:
        count = len(leftovers)
        what += f" ({count} leftover{'s' if count != 1 else ''} of an interrupted backup removed)"
    lease.finish(
        JobState.SUCCEEDED,
        message=what,
        details={
            "firmware_version": info.firmware_version,
            "size": info.size,
            "sha256": info.sha256,
            "leftovers_removed": leftovers,
        },
    )


def register_job_kinds() -> None:
    """The system image kinds of the job engine (BackupsConfig.ready)."""
    for name, label in ((SYSTEM_BACKUP, "System backup"), (SYSTEM_RESTORE, "System restore")):
        jobs_registry.register(
            jobs_registry.Kind(
                name=name,
                label=label,
                category=Category.BACKUP,
                run=system_job_run,
                on_dead="restart",
                max_restarts=2,
                lease_seconds=60.0,
            )
        )
