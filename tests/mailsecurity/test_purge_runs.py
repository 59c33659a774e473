"""Retention purges as jobs of the engine: queued on commit, one at a time, going round again
for a retention shortened meanwhile, started again when their worker dies, and every outcome
written to the event log."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from appliance.mail import purge, retention
from events.models import Category, Event, Severity
from jobs.models import Job, JobState
from jobs.reconciler import enqueue_grace, reconcile
from jobs.tasks import run_job
from mailsecurity import services, tasks
from mailsecurity.models import PURGE, PurgeTrigger
from tests.support import enqueue as enqueues

from .conftest import MailData

pytestmark = pytest.mark.django_db


def _purges() -> list[Job]:
    return list(Job.objects.filter(kind=PURGE))


def test_a_shorter_retention_queues_a_purge_and_enqueues_it_only_on_commit(
    mail: MailData, enqueued, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        result = services.retention_apply(
            {services.store_key(mail.store("Archive")): 3}, user="ann"
        )
        assert enqueued == []  # not before the commit

    assert len(callbacks) == 1
    job = result.purge
    assert result.purge_created and job is not None
    assert enqueued == [job.pk]
    assert job.state == JobState.QUEUED and job.trigger == PurgeTrigger.RETENTION
    assert job.requested_by == "ann"
    assert "Archive: 14 days to 3 days" in job.details["reason"]
    event = Event.objects.get(message__contains="retention changed")
    assert event.message == "Message store Archive retention changed from 14 days to 3 days"
    assert event.username == "ann" and event.category == Category.MAIL


def test_a_longer_retention_is_saved_and_recorded_but_starts_no_purge(mail: MailData, enqueued):
    result = services.retention_apply({services.SMTP_LOG: 120}, user="ann")

    assert result.purge is None and not _purges()
    assert retention.retention_settings().smtp_log_days == 120
    event = Event.objects.get()
    assert event.category == Category.SMTP
    assert event.details == {"retention": "smtp_log", "old_days": 90, "new_days": 120}


def test_an_unchanged_retention_writes_nothing(mail: MailData, enqueued):
    result = services.retention_apply({services.TRACKING_LOG: 90}, user="ann")

    assert result.changes == () and result.purge is None
    assert not Event.objects.exists()


def test_bad_values_are_refused_before_anything_is_written(mail: MailData, enqueued):
    with pytest.raises(ValueError):
        services.retention_apply({services.SMTP_LOG: 10, services.TRACKING_LOG: 0}, user="ann")
    with pytest.raises(KeyError):
        services.retention_apply({"store:999": 5}, user="ann")

    assert retention.retention_settings().smtp_log_days == 90
    assert not Event.objects.exists()


def test_shortening_again_while_a_purge_is_active_asks_that_one_to_go_round_again(
    mail: MailData, enqueued
):
    first, created = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")
    second, created_again = services.purge_start(trigger=PurgeTrigger.PLANNER, user="bob")

    assert created and not created_again
    assert second.pk == first.pk and second.again_requested
    assert len(_purges()) == 1


def test_a_purge_deletes_and_records_rows_bytes_and_an_event(mail: MailData, enqueued):
    for _ in range(300):
        mail.message("Archive", 20, size=5000)
    keep = mail.message("Archive", 1)
    mail.smtp(200)
    mail.commit()
    job, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")

    run_job(job.pk)

    job.refresh_from_db()
    figures = job.details
    assert job.state == JobState.SUCCEEDED and job.percent == 100
    assert figures["messages_deleted"] == 300 and figures["smtp_log_deleted"] == 1
    assert figures["tracking_log_deleted"] == 0
    assert figures["bytes_reclaimed"] > 300 * 5000 // 2
    assert (
        figures["store_bytes_before"] - figures["store_bytes_after"] == figures["bytes_reclaimed"]
    )
    assert figures["disk_free_before"] is not None and figures["disk_free_after"] is not None
    assert job.started_at <= job.finished_at
    assert figures["messages_per_store"] == {
        "Spam quarantine": 0, "Virus quarantine": 0, "Policy violations": 0, "Archive": 300,
    }  # fmt: skip
    assert figures["retention_days"]["Archive"] == 14
    assert mail.ids("quarantined_message") == {keep}
    event = Event.objects.get(message__startswith="Retention purge reclaimed")
    assert "deleted 300 messages, 1 SMTP log and 0 tracking log entries" in event.message
    assert event.details["job"] == job.pk and event.category == Category.MAIL
    assert event.username == "ann"


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED])
def test_a_finished_purge_is_not_run_again(mail: MailData, state, monkeypatch):
    job = Job.objects.create(kind=PURGE, title="Retention purge", state=state)
    monkeypatch.setattr(purge, "purge_expired", lambda **kw: pytest.fail("a second executor ran"))

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == state


def test_a_retention_shortened_during_the_purge_is_purged_before_it_finishes(
    mail: MailData, enqueued, monkeypatch
):
    old_spam = mail.message("Spam quarantine", 10)  # kept at 30 days, expired at 5
    old_archive = mail.message("Archive", 20)  # expired at 14 days
    mail.commit()
    job, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")
    real = purge.purge_expired
    passes: list[int] = []

    def purge_expired(**kwargs):
        result = real(**kwargs)
        passes.append(result.rows_deleted)
        if len(passes) == 1:  # an administrator saves a shorter retention meanwhile
            services.retention_apply({services.store_key(mail.store("Spam quarantine")): 5},
                                     user="bob")  # fmt: skip
        return result

    monkeypatch.setattr(purge, "purge_expired", purge_expired)

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED
    assert passes == [1, 1]
    assert job.details["messages_deleted"] == 2 and not job.again_requested
    assert {old_spam, old_archive}.isdisjoint(mail.ids("quarantined_message"))
    assert len(_purges()) == 1  # no second purge was queued


def test_a_failing_purge_is_failed_and_says_why(mail: MailData, enqueued, monkeypatch):
    job, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")

    def broken(**kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(purge, "purge_expired", broken)

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == JobState.FAILED and "No space left on device" in job.error
    event = Event.objects.get(severity=Severity.ERROR)
    assert event.message == "Retention purge failed: No space left on device"
    # Failed is final: a new purge can start.
    assert services.purge_start(trigger=PurgeTrigger.RETENTION)[1] is True


def test_a_purge_whose_worker_stopped_is_started_again_then_given_up(db, enqueued):
    """A killed purge starts again (deleting expired rows again is harmless), not 'failed'; a
    crash loop is given up after MAX_RESTARTS."""
    lost = Job.objects.create(
        kind=PURGE,
        title="Retention purge",
        state=JobState.RUNNING,
        conflict_group=PURGE,
        lease_owner="job:elsewhere:1:abc",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        fence=1,
    )

    assert reconcile().restarted == [lost.pk]

    lost.refresh_from_db()
    assert (lost.state, lost.restarts) == (JobState.QUEUED, 1)
    assert enqueued == [lost.pk]
    assert Event.objects.filter(message__contains="started again (restart 1 of").exists()
    for _ in range(services.MAX_RESTARTS):
        Job.objects.filter(pk=lost.pk).update(
            state=JobState.RUNNING,
            lease_owner="job:elsewhere:1:abc",
            lease_expires_at=timezone.now() - timedelta(seconds=1),
        )
        reconcile()
    lost.refresh_from_db()
    assert lost.state == JobState.FAILED and "given up" in lost.error
    assert services.purge_start(trigger=PurgeTrigger.RETENTION)[1] is True


def test_a_purge_that_moved_on_while_it_worked_stops_and_is_not_overwritten(
    mail: MailData, enqueued, monkeypatch
):
    for _ in range(40):
        mail.message("Archive", 20)
    mail.commit()
    job, _ = services.purge_start(trigger=PurgeTrigger.RETENTION)
    real = purge.purge_expired

    def taken_away(**kwargs):
        # The reconciler decided the worker was gone before the first progress report.
        Job.objects.filter(pk=job.pk).update(state=JobState.FAILED, error="reconciled")
        return real(**kwargs)

    monkeypatch.setattr(purge, "purge_expired", taken_away)

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.error == "reconciled"
    assert not Event.objects.filter(message__startswith="Retention purge reclaimed").exists()


def test_a_purge_the_broker_refused_stays_queued_and_is_handed_over_again(
    mail: MailData, monkeypatch, django_capture_on_commit_callbacks
):
    enqueues.broker_down(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
        job, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")
    job.refresh_from_db()
    assert job.state == JobState.QUEUED  # the page was answered; nothing failed

    sent = enqueues.capture(monkeypatch, "jobs.run")
    assert reconcile(timezone.now() + enqueue_grace() + timedelta(seconds=1)).enqueued == [job.pk]
    assert sent == [job.pk]


def test_the_daily_purge_starts_its_own_job(mail: MailData, enqueued):
    mail.message("Archive", 30)
    mail.commit()

    job_id = tasks.retention_purge()
    run_job(job_id)

    job = Job.objects.get(pk=job_id)
    assert job.trigger == PurgeTrigger.SCHEDULE and job.details["messages_deleted"] == 1


def test_the_daily_purge_leaves_an_active_one_alone(mail: MailData, enqueued):
    active, _ = services.purge_start(trigger=PurgeTrigger.RETENTION)

    assert tasks.retention_purge() is None

    assert _purges() == [active]
    active.refresh_from_db()
    assert active.state == JobState.QUEUED and not active.again_requested
