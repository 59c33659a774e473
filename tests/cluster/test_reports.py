"""Members' reports on Central: status, events forwarded, unreachable marking; the member's
report, Central's answers, and the preflight's cluster check."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from cluster import member_services, services, signing
from cluster.models import CentralLink, ClusterMember, JoinState, ReceivedNonce
from cluster.preflight import cluster_preflight_check
from events.models import Event, Severity
from events.services import event_write
from tests.cluster.conftest import (
    from_central,
    member_joins,
    receive_report,
    report,
    report_message,
    sent_message,
)


def test_a_report_updates_the_member(joined, django_capture_on_commit_callbacks) -> None:
    member, secret = joined()
    install = {"run_id": 4, "state": "running", "phase": 3, "percent": 25.0, "version": "2.8.1.0"}
    with django_capture_on_commit_callbacks() as sent:
        receive_report("member1", secret, report("2.8.0.0", install=install))
    member.refresh_from_db()
    assert member.firmware_version == "2.8.0.0" and member.healthy and member.install_running
    assert member.install["phase"] == 3 and member.reports == 1
    update = sent_message(sent, "central_update", sender="central", recipient="member1")
    assert update["body"] == {"firmware": "2.8.0.0", "events_cursor": 0}


def test_it_refuses_reports_from_strangers_and_wrong_secrets(joined) -> None:
    member, _secret = joined()
    assert receive_report("member1", "wrong", report("9.9")) is None
    assert receive_report("ghost", "x") is None
    member.refresh_from_db()
    assert member.reports == 0
    refused = Event.objects.filter(message__startswith="Refused a report").order_by("id")
    assert [e.message for e in refused] == [
        "Refused a report from 'member1': its signature is wrong",
        "Refused a report from 'ghost': it is not a member of this cluster",
    ]
    assert all(e.severity == Severity.WARNING for e in refused)


def test_a_replayed_report_is_refused_and_changes_nothing(joined) -> None:
    member, secret = joined()
    message = report_message("member1", secret, report("2.8.0.0"))
    assert services.member_report_receive(message=message)
    assert services.member_report_receive(message=message) is None
    member.refresh_from_db()
    assert member.reports == 1
    assert Event.objects.filter(message__contains="it was received before").count() == 1


def test_a_stale_or_future_report_is_refused(joined, clock) -> None:
    member, secret = joined()
    stale = report_message("member1", secret, now=clock.now() - timedelta(minutes=6))
    future = report_message("member1", secret, now=clock.now() + timedelta(minutes=5))
    assert services.member_report_receive(message=stale) is None
    assert services.member_report_receive(message=future) is None
    member.refresh_from_db()
    assert member.reports == 0
    assert Event.objects.filter(message__contains="sent more than 300 s ago").exists()
    assert Event.objects.filter(message__contains="in the future").exists()
    # Within the window it is accepted, once.
    recent = report_message("member1", secret, now=clock.now() - timedelta(minutes=4))
    assert services.member_report_receive(message=recent)


def test_a_repeated_refusal_writes_one_event_per_window(joined, clock) -> None:
    joined()
    for _ in range(3):  # a removed member that missed its notice, reporting on
        assert receive_report("ghost", "x") is None
    assert Event.objects.filter(message__startswith="Refused a report from 'ghost'").count() == 1
    clock.shift(timedelta(minutes=6))
    receive_report("ghost", "x")
    assert Event.objects.filter(message__startswith="Refused a report from 'ghost'").count() == 2


def test_seen_nonces_are_forgotten_once_their_messages_are_too_old(joined, clock) -> None:
    _member, secret = joined()
    assert receive_report("member1", secret)
    assert ReceivedNonce.objects.count() == 1
    clock.shift(timedelta(minutes=6))
    assert receive_report("member1", secret)
    assert ReceivedNonce.objects.count() == 1  # the first one was pruned


def test_hostile_report_fields_are_cleaned(joined) -> None:
    member, secret = joined()
    hostile = {"firmware": "<b>2.8</b>", "health": "up", "install": {"state": 5, "percent": 900},
               "cluster_upgrade": {"upgrade_id": "1"}}  # fmt: skip
    services.member_report_receive(message=report_message("member1", secret, hostile, events="x"))
    member.refresh_from_db()
    assert member.firmware_version == "2.8.0.0"  # kept from the join
    assert member.health == {} and not member.healthy
    assert member.install == {"percent": 100.0, "version": ""} and member.upgrade_answer == {}


def test_member_events_are_stored_once_with_the_members_name_and_time(joined) -> None:
    _member, secret = joined()
    when = timezone.now() - timedelta(hours=2)
    batch = [
        {"id": 7, "created_at": when.isoformat(), "severity": 30, "category": "update",
         "username": "ops", "message": "Install started", "details": {"run": 1}},
        {"id": 8, "created_at": "garbage", "severity": 99, "category": "nope",
         "username": "", "message": "x" * 900, "details": []},
    ]  # fmt: skip
    for _ in range(2):  # the same batch again (a lost answer): stored once
        receive_report("member1", secret, report(), batch)
    forwarded = Event.objects.filter(node="member1").order_by("id")
    assert forwarded.count() == 2
    first, second = forwarded
    assert first.created_at == when and first.severity == Severity.WARNING
    assert first.username == "ops" and first.details == {"run": 1, "member_event_id": 7}
    assert second.category == "cluster" and second.severity == Severity.INFO
    assert len(second.message) == 500
    assert ClusterMember.objects.get().events_cursor == 8


def test_silent_members_are_marked_unreachable_and_back(joined, settings) -> None:
    settings.CLUSTER_REPORT_SECONDS = 30
    member, secret = joined()
    ClusterMember.objects.filter(pk=member.pk).update(
        last_seen=timezone.now() - timedelta(seconds=89)
    )
    assert services.members_mark_unreachable() == []
    ClusterMember.objects.filter(pk=member.pk).update(
        last_seen=timezone.now() - timedelta(seconds=91)
    )
    assert services.members_mark_unreachable() == ["member1"]
    assert services.members_mark_unreachable() == []  # once
    assert Event.objects.filter(message__startswith="member1 is unreachable").count() == 1
    receive_report("member1", secret)
    assert ClusterMember.objects.get().reachable
    assert Event.objects.filter(message="member1 is reachable again").exists()


def _joined_member(firmware: str = "2.8.0.0") -> None:
    member_joins("t" * 32, secret="s3cret", firmware=firmware)


def test_member_report_carries_new_events_above_the_acknowledged_cursor(
    member_role: str, settings, django_capture_on_commit_callbacks
) -> None:
    settings.CLUSTER_EVENT_BATCH = 2
    _joined_member()
    for n in range(3):
        event_write(category="system", message=f"local {n}")
    with django_capture_on_commit_callbacks() as sent:
        assert member_services.member_report_send()
    message = sent_message(sent, "member_report", sender="member1", recipient="central")
    assert "s3cret" not in json.dumps(message)
    opened = signing.open_sealed(
        message, kind="member_report", recipient="central",
        key=lambda *_: signing.member_key("s3cret"),
    )  # fmt: skip
    assert opened.sender == "member1"
    sent_report, events = opened.body["report"], opened.body["events"]
    assert sent_report["firmware"] == "2.8.0.0" and "healthy" in sent_report["health"]
    assert len(events) == 2 and events[0]["id"] < events[1]["id"]
    update = {"firmware": "2.8.1.0", "events_cursor": events[1]["id"]}
    member_services.central_update_receive(message=from_central("s3cret", "central_update", update))
    _report, rest = member_services.member_report_build()
    newer = Event.objects.filter(id__gt=events[1]["id"]).order_by("id")[:2]
    assert [e["id"] for e in rest] == [e.id for e in newer]
    assert CentralLink.objects.get().central_firmware == "2.8.1.0"


def test_a_member_that_has_not_joined_does_not_report(member_role: str) -> None:
    assert not member_services.member_report_send()


@pytest.mark.parametrize(
    ("role", "central_level", "bundle", "status", "value"),
    [
        ("standalone", "", "2.8.1.0", "pass", "standalone"),
        ("central", "", "2.8.1.0", "pass", "Central"),
        ("member", "2.8.1.0", "2.8.1.0", "pass", "Central runs 2.8.1.0"),
        ("member", "2.8.1.0", "2.8.0.5", "pass", "Central runs 2.8.1.0"),
        ("member", "2.8.0.0", "2.8.1.0", "fail", "Cluster Central runs 2.8.0.0"),
        ("member", None, "2.8.1.0", "fail", "not known"),
    ],
)
def test_preflight_cluster_check(
    settings, demo_appliance, db, role, central_level, bundle, status, value
) -> None:
    pytest.importorskip("appliance.firmware.preflight")
    settings.CLUSTER_ROLE = role
    settings.NODE_NAME = "member1" if role == "member" else "central"
    if central_level is not None and role == "member":
        _joined_member(central_level)
    check = cluster_preflight_check(bundle)
    assert (check.key, check.status) == ("cluster", status)
    assert value in check.value
    if status == "fail" and central_level:
        assert check.advice == "Upgrade Cluster Central first"


def test_member_autojoin_uses_the_configured_token_once(member_role: str, settings) -> None:
    settings.CLUSTER_JOIN_TOKEN = "t" * 32
    assert member_services.member_autojoin()
    assert CentralLink.objects.get().state == JoinState.PENDING
    assert not member_services.member_autojoin()


def test_central_updates_are_accepted_only_signed_by_our_central(member_role: str) -> None:
    _joined_member("2.8.0.0")
    update = {"firmware": "9.9.9.9", "events_cursor": 10**9}
    for forged in (
        ["central", "9.9.9.9", 10**9],  # the arguments of old, unsigned messages
        from_central("wrong", "central_update", update),
        from_central("s3cret", "central_update", update, central="rogue"),
        from_central("s3cret", "central_update", update, node="member2"),
    ):
        member_services.central_update_receive(message=forged)
    link = CentralLink.objects.get()
    assert link.central_firmware == "2.8.0.0" and link.events_acked == 0
    assert Event.objects.filter(message__startswith="Refused an update").count() == 4
