"""Celery interface to the retention purge: fetch by id, call the service, return."""

from __future__ import annotations

from celery import shared_task

from mailsecurity import services


@shared_task(name="mailsecurity.tasks.retention_purge")
def retention_purge(run_id: int | None = None) -> str | None:
    """Run a queued purge; from beat (no run id), create today's run and run it.

    Not retried: a purge that failed half-way has deleted only expired rows, and the next one
    (tonight's at the latest) carries on from there.
    """
    if run_id is None:
        from upgrades.install import install_holds_maintenance

        if install_holds_maintenance():
            return None  # the firmware install owns the message store until it commits
    state = services.purge_scheduled() if run_id is None else services.purge_run_execute(run_id)
    return str(state) if state is not None else None
