"""Job rows for the tests of the one job engine (jobs.models.Job)."""

from __future__ import annotations

from jobs.models import Job, JobState


def appliance_job_running(kind: str, title: str) -> Job:
    """A job of ``kind`` changing the appliance right now, started by admin: every other job
    that changes the appliance must refuse to start beside it, naming it by ``title``."""
    return Job.objects.create(
        kind=kind,
        title=title,
        state=JobState.RUNNING,
        conflict_group="appliance",
        requested_by="admin",
    )
