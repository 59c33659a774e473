"""Purge runs: created before they are enqueued, one at a time, claimed and finished by
conditional updates, and every outcome written to the event log."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from appliance.mail import purge, retention
from events.models import Category, Event, Severity
from mailsecurity import services, tasks
from mailsecurity.models import PurgePhase, PurgeRun, PurgeState, PurgeTrigger
from tests.support import enqueue as enqueues

from .conftest import MailData

pytestmark = pytest.mark.django_db


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:
    """Run ids handed to the broker (no broker in these tests)."""
    return enqueues.capture(monkeypatch, "mailsecurity.tasks.retention_purge")


def test_a_shorter_retention_queues_a_run_and_enqueues_it_only_on_commit(
    mail: MailData, enqueued, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        result = services.retention_apply(
            {services.store_key(mail.store("Archive")): 3}, user="ann"
        )
        assert enqueued == []  # not before the commit

    assert len(callbacks) == 1
    run = result.purge
    assert result.purge_created and run is not None
    assert enqueued == [run.pk]
    assert run.state == PurgeState.QUEUED and run.trigger == PurgeTrigger.RETENTION
    assert run.requested_by == "ann"
    assert "Archive: 14 days to 3 days" in run.reason
    event = Event.objects.get(message__contains="retention changed")
    assert event.message == "Message store Archive retention changed from 14 days to 3 days"
    assert event.username == "ann" and event.category == Category.MAIL


def test_a_longer_retention_is_saved_and_recorded_but_starts_no_purge(mail: MailData, enqueued):
    result = services.retention_apply({services.SMTP_LOG: 120}, user="ann")

    assert result.purge is None and not PurgeRun.objects.exists()
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


def test_the_database_refuses_a_second_active_run(db):
    PurgeRun.objects.create(trigger=PurgeTrigger.RETENTION)

    with pytest.raises(IntegrityError), transaction.atomic():
        PurgeRun.objects.create(trigger=PurgeTrigger.SCHEDULE)
    with pytest.raises(IntegrityError), transaction.atomic():
        PurgeRun.objects.create(trigger=PurgeTrigger.SCHEDULE, state=PurgeState.RUNNING)
    # Finished runs do not count.
    PurgeRun.objects.create(trigger=PurgeTrigger.SCHEDULE, state=PurgeState.SUCCEEDED)
    PurgeRun.objects.create(trigger=PurgeTrigger.SCHEDULE, state=PurgeState.FAILED)


def test_shortening_again_while_a_run_is_active_asks_that_run_to_go_round_again(
    mail: MailData, enqueued
):
    first, created = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")
    second, created_again = services.purge_start(trigger=PurgeTrigger.PLANNER, user="bob")

    assert created and not created_again
    assert second.pk == first.pk and second.follow_up
    assert PurgeRun.objects.count() == 1


def test_executing_a_run_purges_and_records_rows_bytes_and_an_event(mail: MailData, enqueued):
    for _ in range(300):
        mail.message("Archive", 20, size=5000)
    keep = mail.message("Archive", 1)
    mail.smtp(200)
    mail.commit()
    run, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")

    state = tasks.retention_purge(run.pk)

    run.refresh_from_db()
    assert state == PurgeState.SUCCEEDED == run.state
    assert run.phase == PurgePhase.DONE
    assert run.messages_deleted == 300 and run.smtp_log_deleted == 1
    assert run.tracking_log_deleted == 0
    assert run.bytes_reclaimed > 300 * 5000 // 2
    assert run.store_bytes_before - run.store_bytes_after == run.bytes_reclaimed
    assert run.disk_free_before is not None and run.disk_free_after is not None
    assert run.started_at <= run.finished_at
    assert run.details["messages_per_store"] == {
        "Spam quarantine": 0, "Virus quarantine": 0, "Policy violations": 0, "Archive": 300,
    }  # fmt: skip
    assert run.details["retention_days"]["Archive"] == 14
    assert mail.ids("quarantined_message") == {keep}
    event = Event.objects.get(message__startswith="Retention purge reclaimed")
    assert event.details["bytes_reclaimed"] == run.bytes_reclaimed
    assert event.details["messages_deleted"] == 300
    assert event.username == "ann"


@pytest.mark.parametrize("state", [PurgeState.RUNNING, PurgeState.SUCCEEDED, PurgeState.FAILED])
def test_the_task_refuses_a_run_that_is_not_queued(mail: MailData, state, monkeypatch):
    run = PurgeRun.objects.create(trigger=PurgeTrigger.RETENTION, state=state)
    monkeypatch.setattr(purge, "purge_expired", lambda **kw: pytest.fail("a second executor ran"))

    assert tasks.retention_purge(run.pk) is None

    run.refresh_from_db()
    assert run.state == state


def test_a_retention_shortened_during_the_run_is_purged_before_it_finishes(
    mail: MailData, enqueued, monkeypatch
):
    old_spam = mail.message("Spam quarantine", 10)  # kept at 30 days, expired at 5
    old_archive = mail.message("Archive", 20)  # expired at 14 days
    mail.commit()
    run, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")
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

    assert tasks.retention_purge(run.pk) == PurgeState.SUCCEEDED

    run.refresh_from_db()
    assert passes == [1, 1]
    assert run.messages_deleted == 2 and not run.follow_up
    assert {old_spam, old_archive}.isdisjoint(mail.ids("quarantined_message"))
    assert PurgeRun.objects.count() == 1  # no second run was queued


def test_a_failing_purge_marks_the_run_failed_and_says_why(mail: MailData, enqueued, monkeypatch):
    run, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")

    def broken(**kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(purge, "purge_expired", broken)

    assert tasks.retention_purge(run.pk) == PurgeState.FAILED

    run.refresh_from_db()
    assert run.state == PurgeState.FAILED and "No space left on device" in run.error
    event = Event.objects.get(severity=Severity.ERROR)
    assert event.message == "Retention purge failed: No space left on device"
    # Failed is final: a new purge can start.
    assert services.purge_start(trigger=PurgeTrigger.RETENTION)[1] is True


def test_a_run_whose_worker_stopped_is_started_again_then_given_up(
    db, enqueued, django_capture_on_commit_callbacks
):
    """A killed purge resumes (deleting expired rows again is harmless), not 'failed'; a crash
    loop is given up after MAX_RESTARTS."""
    long_ago = timezone.now() - services.STALE_AFTER - timedelta(seconds=1)
    stale = PurgeRun.objects.create(
        trigger=PurgeTrigger.RETENTION, state=PurgeState.RUNNING, heartbeat_at=long_ago
    )

    with django_capture_on_commit_callbacks(execute=True):
        run, created = services.purge_start(trigger=PurgeTrigger.RETENTION)

    stale.refresh_from_db()
    assert not created and run.pk == stale.pk  # the lost run covers the new request
    assert (stale.state, stale.restarts, stale.follow_up) == (PurgeState.QUEUED, 1, True)
    assert enqueued == [stale.pk]
    assert Event.objects.filter(message__contains="started again (restart 1 of").exists()

    for _ in range(services.MAX_RESTARTS):
        PurgeRun.objects.filter(pk=stale.pk).update(state=PurgeState.RUNNING, heartbeat_at=long_ago)
        services.purge_runs_reap()
    stale.refresh_from_db()
    assert stale.state == PurgeState.FAILED and "given up" in stale.error
    assert services.purge_start(trigger=PurgeTrigger.RETENTION)[1] is True


def test_a_starting_worker_resumes_the_purge_it_was_running(db, enqueued):
    mine = PurgeRun.objects.create(
        trigger=PurgeTrigger.RETENTION,
        state=PurgeState.RUNNING,
        heartbeat_at=timezone.now(),
        executor="worker@box",
    )
    assert services.purge_runs_reap() == 0  # alive as far as anyone can tell
    assert services.purge_runs_reap(executor="worker@box") == 1  # its worker restarted
    mine.refresh_from_db()
    assert (mine.state, mine.executor, mine.restarts) == (PurgeState.QUEUED, "", 1)


def test_a_live_run_is_not_reaped(db):
    live = PurgeRun.objects.create(
        trigger=PurgeTrigger.RETENTION, state=PurgeState.RUNNING, heartbeat_at=timezone.now()
    )

    assert services.purge_runs_reap() == 0
    live.refresh_from_db()
    assert live.state == PurgeState.RUNNING


def test_a_run_reaped_while_it_works_stops_and_is_not_overwritten(mail: MailData, monkeypatch):
    for _ in range(40):
        mail.message("Archive", 20)
    mail.commit()
    run = PurgeRun.objects.create(trigger=PurgeTrigger.RETENTION)
    real = purge.purge_expired

    def reaped_midway(**kwargs):
        # Another process decides the run was lost before the first progress report.
        PurgeRun.objects.filter(pk=run.pk).update(state=PurgeState.FAILED, error="reaped")
        return real(**kwargs)

    monkeypatch.setattr(purge, "purge_expired", reaped_midway)

    assert tasks.retention_purge(run.pk) == PurgeState.FAILED

    run.refresh_from_db()
    assert run.error == "reaped"
    assert not Event.objects.filter(message__startswith="Retention purge reclaimed").exists()


def test_a_broker_that_refuses_the_task_fails_the_run_instead_of_the_page(
    mail: MailData, monkeypatch, django_capture_on_commit_callbacks
):
    enqueues.broker_down(monkeypatch)

    with django_capture_on_commit_callbacks(execute=True):
        run, _ = services.purge_start(trigger=PurgeTrigger.RETENTION, user="ann")

    run.refresh_from_db()
    assert run.state == PurgeState.FAILED and "redis is down" in run.error
    assert Event.objects.filter(severity=Severity.ERROR, category=Category.MAIL).exists()


def test_the_daily_run_creates_its_own_run(mail: MailData):
    mail.message("Archive", 30)
    mail.commit()

    assert tasks.retention_purge() == PurgeState.SUCCEEDED

    run = PurgeRun.objects.get()
    assert run.trigger == PurgeTrigger.SCHEDULE and run.messages_deleted == 1


def test_the_daily_run_leaves_an_active_run_alone(mail: MailData, enqueued):
    active, _ = services.purge_start(trigger=PurgeTrigger.RETENTION)

    assert tasks.retention_purge() is None

    assert list(PurgeRun.objects.all()) == [active]
    active.refresh_from_db()
    assert active.state == PurgeState.QUEUED
