"""The process dying in the middle of a multi-step write, for the tests of recovery."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


class Crash(BaseException):
    """Stands for the process dying: a BaseException, so nothing in the code under test
    catches it."""


@contextmanager
def crash_on_call(owner: object, name: str, number: int) -> Iterator[None]:
    """``owner.name`` works as before but raises Crash on its ``number``-th call (the calls before
    have done their work); the real one is back when the block is left."""
    real = getattr(owner, name)
    calls = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == number:
            raise Crash
        return real(*args, **kwargs)

    setattr(owner, name, counting)
    try:
        yield
    finally:
        setattr(owner, name, real)


def killed_at_step(code: str, env: dict[str, str], kind: str, step: int) -> Any:
    """Run ``code`` (Python that starts a job of ``kind`` in its own process, as a page or the
    CLI does with jobs.engine.run_here) with a pause at ``step`` (LMI_JOB_PAUSE), SIGKILL it
    there, and return the job it left running under a dead holder."""
    import subprocess
    import sys

    from django.conf import settings

    from jobs.models import Job
    from tests.support.services import wait_for

    script = f"import django\ndjango.setup()\n{code}\n"
    env = {**env, "LMI_JOB_PAUSE": f"{kind}:{step}:30000"}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=settings.BASE_DIR, env=env)

    def reached() -> Any:
        job = Job.objects.filter(kind=kind, step=step).first()
        # A new job's step is 0 before it reports any: step 0 is reached once it is named
        # (every kind names its step 0). Killed earlier, the step's own write was not made yet
        # (seen in CI: a release killed before its claim).
        return None if job is None or (step == 0 and not job.step_name) else job

    try:
        return wait_for(
            reached,
            timeout=30,
            message=f"the {kind} job did not reach step {step}",
        )
    finally:
        process.kill()
        process.wait()


def taken_over(job: Any, monkeypatch: Any, how: str = "resumed") -> Any:
    """The reconciler's pass finds ``job``'s holder gone and hands it on (``how``: the
    Reconciled list it must be in); a worker's task then runs it here. The job, reloaded."""
    from jobs.reconciler import reconcile
    from jobs.tasks import run_job
    from tests.support import enqueue as enqueues

    sent = enqueues.capture(monkeypatch, "jobs.run")
    assert getattr(reconcile(), how) == [job.pk] and sent == [job.pk]
    run_job(job.pk)
    job.refresh_from_db()
    return job


# The phases of a kill test (install or return). Both database passes run the phases where
# the engine could change something: 2 (online), 7 (the downtime's store swap), 10 (the
# commit); the others prove the same conditional writes again (marked every_phase, so CI's
# PostgreSQL pass skips them).
EVERY_PHASE = [
    phase if phase in (2, 7, 10) else pytest.param(phase, marks=pytest.mark.every_phase)
    for phase in range(1, 11)
]
