"""Members' reports on Central: status, events forwarded, unreachable marking; the member's
report, Central's answers, and the preflight's cluster check."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from cluster import services
from cluster.models import CentralLink, ClusterMember, JoinState
from events.models import Event, Severity
from events.services import event_write
from tests.cluster.conftest import report


def test_a_report_updates_the_member(joined, django_capture_on_commit_callbacks) -> None:
    member, secret = joined()
    install = {"run_id": 4, "state": "running", "phase": 3, "percent": 25.0, "version": "2.8.1.0"}
    with django_capture_on_commit_callbacks() as sent:
        services.member_report_receive(
            node="member1", secret=secret, report=report("2.8.0.0", install=install), events=[]
        )
    member.refresh_from_db()
    assert member.firmware_version == "2.8.0.0" and member.healthy and member.install_running
    assert member.install["phase"] == 3 and member.reports == 1
    answer = [c for c in sent if isinstance(c, services.Outgoing)]
    assert [(c.task, c.queue) for c in answer] == [
        ("cluster.tasks.central_update", "lmi.node.member1")
    ]
    assert answer[0].args == ("central", "2.8.0.0", 0)


def test_it_ignores_reports_from_strangers_and_wrong_secrets(joined) -> None:
    member, _secret = joined()
    assert services.member_report_receive(node="member1", secret="wrong", report=report("9.9"),
                                          events=[]) is None  # fmt: skip
    assert (
        services.member_report_receive(node="ghost", secret="x", report=report(), events=[]) is None
    )
    member.refresh_from_db()
    assert member.reports == 0


def test_hostile_report_fields_are_cleaned(joined) -> None:
    member, secret = joined()
    hostile = {"firmware": "<b>2.8</b>", "health": "up", "install": {"state": 5, "percent": 900},
               "cluster_upgrade": {"upgrade_id": "1"}}  # fmt: skip
    services.member_report_receive(node="member1", secret=secret, report=hostile, events="x")
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
        services.member_report_receive(node="member1", secret=secret, report=report(), events=batch)
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
    services.member_report_receive(node="member1", secret=secret, report=report(), events=[])
    assert ClusterMember.objects.get().reachable
    assert Event.objects.filter(message="member1 is reachable again").exists()


def _joined_member(firmware: str = "2.8.0.0") -> None:
    services.cluster_join_request(token="t" * 32, user="admin")
    services.join_answer_receive(
        central="central", accepted=True, message="", secret="s3cret", firmware=firmware
    )


def test_member_report_carries_new_events_above_the_acknowledged_cursor(
    member_role: str, settings, django_capture_on_commit_callbacks
) -> None:
    settings.CLUSTER_EVENT_BATCH = 2
    _joined_member()
    for n in range(3):
        event_write(category="system", message=f"local {n}")
    with django_capture_on_commit_callbacks() as sent:
        assert services.member_report_send()
    out = [c for c in sent if isinstance(c, services.Outgoing)]
    assert [(c.task, c.queue) for c in out] == [("cluster.tasks.member_report", "lmi.node.central")]
    node, secret, sent_report, events = out[0].args
    assert (node, secret) == ("member1", "s3cret")
    assert sent_report["firmware"] == "2.8.0.0" and "healthy" in sent_report["health"]
    assert len(events) == 2 and events[0]["id"] < events[1]["id"]
    services.central_update_receive(central="central", firmware="2.8.1.0",
                                    events_cursor=events[1]["id"])  # fmt: skip
    _report, rest = services.member_report_build()
    newer = Event.objects.filter(id__gt=events[1]["id"]).order_by("id")[:2]
    assert [e["id"] for e in rest] == [e.id for e in newer]
    assert CentralLink.objects.get().central_firmware == "2.8.1.0"


def test_a_member_that_has_not_joined_does_not_report(member_role: str) -> None:
    assert not services.member_report_send()


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
    pytest.importorskip("appliance.preflight")
    settings.CLUSTER_ROLE = role
    settings.NODE_NAME = "member1" if role == "member" else "central"
    if central_level is not None and role == "member":
        _joined_member(central_level)
    check = services.cluster_preflight_check(bundle)
    assert (check.key, check.status) == ("cluster", status)
    assert value in check.value
    if status == "fail" and central_level:
        assert check.advice == "Upgrade Cluster Central first"


def test_member_autojoin_uses_the_configured_token_once(member_role: str, settings) -> None:
    settings.CLUSTER_JOIN_TOKEN = "t" * 32
    assert services.member_autojoin()
    assert CentralLink.objects.get().state == JoinState.PENDING
    assert not services.member_autojoin()
