"""Celery interface to the retention purge: the daily start (the job engine runs it)."""

from __future__ import annotations

from celery import shared_task

from mailsecurity import services


@shared_task(name="mailsecurity.tasks.retention_purge", ignore_result=True)
def retention_purge() -> int | None:
    """Beat: start today's purge, unless the firmware install owns the message store.

    The purge itself is a job (jobs.run): the engine claims it, and its reconciler starts it
    again when its worker dies.
    """
    from upgrades.install import install_holds_maintenance

    if install_holds_maintenance():
        return None  # the install owns the message store until it commits
    job = services.purge_scheduled()
    return job.pk if job is not None else None
