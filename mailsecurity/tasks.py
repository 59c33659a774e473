"""Celery interface to the retention purge: fetch by id, call the service, return."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from mailsecurity import services

logger = logging.getLogger(__name__)


@shared_task(bind=True, name="mailsecurity.tasks.retention_purge")
def retention_purge(self: Any, run_id: int | None = None) -> str | None:
    """Run a queued purge; from beat (no run id), create today's run and run it.

    Not retried: a purge that failed half-way has deleted only expired rows, and the next one
    (tonight's at the latest) carries on from there. One whose worker died is started again
    (services.purge_runs_reap).
    """
    executor = self.request.hostname or ""
    if run_id is None:
        from upgrades.install import install_holds_maintenance

        if install_holds_maintenance():
            return None  # the firmware install owns the message store until it commits
    state = (
        services.purge_scheduled(executor=executor)
        if run_id is None
        else services.purge_run_execute(run_id, executor=executor)
    )
    return str(state) if state is not None else None


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Start again the purge the previous run of this worker left running; enqueue queued ones."""
    try:
        restarted = services.purge_runs_reap(executor=getattr(sender, "hostname", None))
        if restarted:
            logger.info("started again %s retention purges whose worker stopped", restarted)
        services.purge_runs_requeue()
    except Exception:  # never keep a worker from starting
        logger.exception("could not recover retention purges at start-up")
