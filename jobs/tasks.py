"""Celery interface of the job engine: claim by id, run the kind, write the outcome.

``jobs.run`` runs any job; a second delivery finds the job held (or finished) and does nothing.
``jobs.reconcile`` is on the beat every few seconds and runs once when a worker starts, so a
lost enqueue or a killed worker costs one reconcile period, never a stuck job.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.db import close_old_connections

from jobs import engine, leases, reconciler, registry
from jobs.models import JobState

logger = logging.getLogger(__name__)

# Long kinds (a system image on a slow disk) bound themselves; this only stops a hung task.
JOB_SOFT_TIME_LIMIT = 6 * 3600
JOB_TIME_LIMIT = JOB_SOFT_TIME_LIMIT + 120


def run_job(job_id: int) -> None:
    """Claim the job, run its kind (or its rollback) under a heartbeat, write the outcome."""
    lease = engine.claim(job_id, leases.executor_name("job"))
    if lease is None:
        logger.info("job %s is held elsewhere or finished; not running it", job_id)
        return
    spec = registry.get(lease.kind)
    rolling_back = bool(lease.job().details.get("rollback"))
    try:
        with lease.keep_alive():
            if rolling_back:
                assert spec.rollback is not None
                spec.rollback(lease)
            else:
                assert spec.run is not None  # registry.register: only driven kinds have none
                spec.run(lease)
    except engine.LeaseLost:
        logger.warning("job %s moved on without this worker", job_id)
        return
    except Exception as exc:  # the kind's refusals, OS errors, the soft time limit
        logger.exception("job %s failed", job_id)
        lease.finish(JobState.FAILED, error=str(exc) or type(exc).__name__)
        return
    # A kind that did not write its own final state succeeded (or was rolled back).
    lease.finish(JobState.ROLLED_BACK if rolling_back else JobState.SUCCEEDED)


@shared_task(
    name="jobs.run",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=JOB_SOFT_TIME_LIMIT,
    time_limit=JOB_TIME_LIMIT,
)
def run(job_id: int) -> None:
    close_old_connections()
    run_job(job_id)


@shared_task(name="jobs.reconcile", ignore_result=True)
def reconcile() -> int:
    """Beat: hand lost jobs to the worker again, recover those whose worker died."""
    done = reconciler.reconcile()
    return len(done.enqueued) + len(done.restarted) + len(done.resumed) + len(done.failed)


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """A worker that starts may be the one that died: reconcile at once."""
    try:
        reconciler.reconcile()
    except Exception:  # never keep a worker from starting
        logger.exception("could not reconcile jobs at start-up")
