"""The job engine: claims and fences, one job per group, progress, cancel, and the reconciler."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from events.models import Category, Event
from jobs import engine, registry
from jobs.models import Job, JobState
from jobs.reconciler import enqueue_grace, reconcile
from jobs.tasks import run_job
from tests.support import enqueue as enqueues

RAN: list[tuple[str, int]] = []


def _work(lease: engine.Lease) -> None:
    RAN.append(("run", lease.job_id))
    for step in range(1, 4):
        lease.progress(step=step, steps=3, step_name=f"step {step}")


def _undo(lease: engine.Lease) -> None:
    RAN.append(("rollback", lease.job_id))


@pytest.fixture(autouse=True)
def kinds() -> Iterator[None]:
    """Test kinds, one per recovery rule, registered in this process only."""
    for on_dead in ("resume", "restart", "rollback", "fail"):
        registry.register(
            registry.Kind(
                name=f"test_{on_dead}",
                label=f"Test {on_dead}",
                category=Category.SYSTEM,
                run=_work,
                on_dead=on_dead,  # type: ignore[arg-type]
                rollback=_undo,
                cancellable=on_dead == "resume",
                max_restarts=1,
            )
        )
    RAN.clear()
    yield


def _running(kind: str, **fields: object) -> Job:
    """A job some worker elsewhere held until a moment ago."""
    values: dict[str, object] = {
        "kind": kind,
        "title": "Test job",
        "state": JobState.RUNNING,
        "lease_owner": "job:elsewhere:1:abc",
        "lease_expires_at": timezone.now() - timedelta(seconds=1),
        "fence": 3,
    }
    values.update(fields)
    return Job.objects.create(**values)


def test_start_queues_once_per_group_and_enqueues_on_commit(
    db, monkeypatch, django_capture_on_commit_callbacks
):
    sent = enqueues.capture(monkeypatch, "jobs.run")
    with django_capture_on_commit_callbacks(execute=True):
        job = engine.start("test_resume", title="Test job", user="admin", conflict_group="g")
    assert sent == [job.pk] and job.state == JobState.QUEUED and job.requested_by == "admin"

    with pytest.raises(engine.JobConflict, match="already in progress") as refused:
        engine.start("test_fail", title="Other", conflict_group="g")
    assert refused.value.active == job
    engine.start("test_fail", title="Other group", conflict_group="h")
    engine.start("test_fail", title="No group")
    engine.start("test_fail", title="No group either")
    assert Job.objects.count() == 4


def test_a_broker_that_refuses_leaves_the_job_queued_for_the_reconciler(
    db, monkeypatch, django_capture_on_commit_callbacks
):
    enqueues.broker_down(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
        job = engine.start("test_resume", title="Test job")
    job.refresh_from_db()
    assert job.state == JobState.QUEUED

    sent = enqueues.capture(monkeypatch, "jobs.run")
    assert reconcile().enqueued == []  # within the grace its message may still arrive
    assert reconcile(timezone.now() + enqueue_grace() + timedelta(seconds=1)).enqueued == [job.pk]
    assert sent == [job.pk]


def test_a_claim_fences_out_the_previous_holder(db):
    job = Job.objects.create(kind="test_resume", title="Test job")
    first = engine.claim(job.pk, "job:one:1:a")
    assert first is not None and engine.claim(job.pk, "job:two:2:b") is None  # held

    Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    second = engine.claim(job.pk, "job:two:2:b")
    assert second is not None and second.fence == first.fence + 1

    with pytest.raises(engine.LeaseLost):
        first.progress(step=1, steps=3)
    assert first.finish(JobState.SUCCEEDED) is False
    second.progress(step=2, steps=3, step_name="two")
    job.refresh_from_db()
    assert (job.step, job.lease_owner, job.state) == (2, "job:two:2:b", JobState.RUNNING)


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(db):
    process = subprocess.Popen(["true"])
    process.wait()
    gone = process.pid
    job = _running(
        "test_resume",
        lease_owner=f"job:{socket.gethostname()}:{gone}:x",
        lease_expires_at=timezone.now() + timedelta(minutes=5),
    )
    assert engine.claim(job.pk, "job:me:1:a") is not None


def test_run_job_runs_every_step_and_a_second_delivery_does_nothing(db):
    job = Job.objects.create(kind="test_resume", title="Test job", requested_by="admin")
    run_job(job.pk)
    run_job(job.pk)
    job.refresh_from_db()
    assert [("run", job.pk)] == RAN
    assert job.state == JobState.SUCCEEDED and job.percent == 100 and job.step == 3
    assert not job.lease_owner and job.finished_at is not None
    assert Event.objects.filter(message="Test job succeeded", category=Category.SYSTEM).exists()


def test_cancel(db):
    queued = Job.objects.create(kind="test_fail", title="Queued")
    assert engine.cancel(queued.pk, user="admin").state == JobState.CANCELLED

    running = _running("test_resume", lease_expires_at=timezone.now() + timedelta(minutes=1))
    assert engine.cancel(running.pk, user="admin").cancel_requested
    lease = engine.Lease(running.pk, running.lease_owner, running.fence, running.kind, 30.0)
    assert lease.cancel_requested()

    stubborn = _running("test_fail", lease_expires_at=timezone.now() + timedelta(minutes=1))
    with pytest.raises(engine.JobError, match="cannot be cancelled"):
        engine.cancel(stubborn.pk, user="admin")
    with pytest.raises(engine.JobError, match="not running"):
        engine.cancel(queued.pk, user="admin")


def test_the_reconciler_applies_each_kinds_rule(db, monkeypatch):
    sent = enqueues.capture(monkeypatch, "jobs.run")
    resume, restart = _running("test_resume"), _running("test_restart")
    rollback, fail = _running("test_rollback"), _running("test_fail")
    alive = _running("test_fail", lease_expires_at=timezone.now() + timedelta(minutes=1))

    done = reconcile()

    assert (done.resumed, done.restarted) == ([resume.pk], [restart.pk])
    assert (done.rolling_back, done.failed) == ([rollback.pk], [fail.pk])
    assert sorted(sent) == sorted([resume.pk, restart.pk, rollback.pk])
    states = dict(Job.objects.values_list("pk", "state"))
    assert states[fail.pk] == JobState.FAILED and states[alive.pk] == JobState.RUNNING
    assert all(states[pk] == JobState.QUEUED for pk in (resume.pk, restart.pk, rollback.pk))
    assert not reconcile()  # idempotent: nothing left to do

    run_job(rollback.pk)  # the rollback runs instead of the work
    assert [("rollback", rollback.pk)] == RAN
    assert Job.objects.get(pk=rollback.pk).state == JobState.ROLLED_BACK


def test_a_job_whose_worker_keeps_dying_is_given_up(db, monkeypatch):
    enqueues.capture(monkeypatch, "jobs.run")
    job = _running("test_restart", restarts=1)
    assert reconcile().failed == [job.pk]
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "2 times" in job.error


def test_progress_gives_percent_and_time_left_in_one_shape(db):
    job = Job.objects.create(kind="test_resume", title="Test job", bytes_total=1000)
    lease = engine.claim(job.pk, "job:me:1:a")
    assert lease is not None
    lease.progress(step=1, steps=4, bytes_done=100)
    Job.objects.filter(pk=job.pk).update(rate=100.0)  # the smoothed rate (lmi.progress.RateMeter)
    job.refresh_from_db()
    assert (job.bytes_done, job.step, job.seconds_left) == (100, 1, 9)
    shown = engine.job_dict(job)
    assert shown["percent"] == 10.0 and shown["cancellable"] is True
    assert shown["state"] == "running" and shown["label"] == "Test resume"


def test_run_here_holds_the_job_in_this_process_and_returns_what_the_body_returns(db):
    seen: list[Job] = []

    def body(lease: engine.Lease) -> str:
        seen.append(lease.job())
        lease.progress(step=1, steps=2, step_name="half way")
        return "done"

    assert engine.run_here("test_resume", body, title="Here", conflict_group="g") == "done"

    held = seen[0]
    assert held.state == JobState.RUNNING and held.lease_owner.startswith("here:")
    job = Job.objects.get()
    assert job.state == JobState.SUCCEEDED and job.step == 2 and job.lease_owner == ""


def test_run_here_fails_the_job_and_raises_the_bodys_error_and_refuses_a_busy_group(db):
    engine.start("test_fail", title="Busy", conflict_group="g")

    with pytest.raises(engine.JobConflict):
        engine.run_here("test_fail", lambda lease: None, title="Here", conflict_group="g")

    def broken(lease: engine.Lease) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        engine.run_here("test_fail", broken, title="Broken")
    failed = Job.objects.get(title="Broken")
    assert failed.state == JobState.FAILED and failed.error == "disk full"


def test_a_job_whose_process_died_is_resumed_by_a_worker(db, monkeypatch):
    sent = enqueues.capture(monkeypatch, "jobs.run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    job = _running(
        "test_resume",
        lease_owner=f"here:{socket.gethostname()}:{dead.pid}:gone",
        lease_expires_at=timezone.now() + timedelta(minutes=1),
    )

    assert reconcile().resumed == [job.pk] and sent == [job.pk]

    assert Event.objects.filter(message__contains="interrupted: its process stopped").exists()
    run_job(job.pk)
    assert Job.objects.get(pk=job.pk).state == JobState.SUCCEEDED
