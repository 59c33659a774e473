"""A join never takes over a member's name: the name stays taken until an administrator removes
the member; the attempt is refused, answered, logged and spends its token. A member's secret
never shows on a page, in an event, in the API or in what Celery logs of a message."""

from __future__ import annotations

import pytest
from django.urls import reverse

from cluster import member_services, plumbing, services, signing, tasks
from cluster.models import CentralLink, ClusterMember, JoinState, JoinToken
from events.models import Event, Severity
from tests.cluster.conftest import (
    from_central,
    join_answer,
    join_request,
    member_joins,
    receive_report,
    report_message,
    sent_message,
)


def test_a_second_join_under_a_taken_name_is_refused_and_keeps_the_members_secret(
    joined, django_capture_on_commit_callbacks
) -> None:
    original, secret = joined("member1")
    row, token = services.join_token_create(user="admin")
    request = join_request(token, info={"hostname": "evil.example"})
    with django_capture_on_commit_callbacks() as sent:
        accepted = services.join_request_receive(message=request, origin="gen7@evil")
    assert not accepted
    member = ClusterMember.objects.get(node="member1")
    assert member.secret_hash == original.secret_hash == signing.member_key(secret)
    assert member.hostname == original.hostname
    # The original member still reports with its secret.
    assert receive_report("member1", secret)
    body = sent_message(sent, "join_answer", sender="central", recipient="member1")["body"]
    ok, message, new_secret = body["accepted"], body["message"], body["secret"]
    assert not ok and new_secret == "" and "member1 is taken" in message
    assert "remove that member" in message
    event = Event.objects.get(message__startswith="Refused a join request from 'member1'")
    assert event.severity == Severity.WARNING
    assert "gen7@evil" in event.message and "evil.example" in event.message
    assert event.details["origin"] == "gen7@evil" and event.details["token_id"] == row.pk


def test_a_refused_attempt_spends_its_token_so_it_cannot_be_used_after_a_removal(joined) -> None:
    joined("member1")
    row, token = services.join_token_create(user="admin")
    with pytest.raises(plumbing.JoinRefused, match="taken"):
        services.member_join(node="member1", token_hash=signing.token_hash(token), info={})
    assert JoinToken.objects.get(pk=row.pk).used_at is not None
    # Even once the name is free, the token an attacker tried with is worth nothing.
    services.member_remove(node="member1", user="admin")
    with pytest.raises(plumbing.JoinRefused, match="already used"):
        services.member_join(node="member1", token_hash=signing.token_hash(token), info={})
    assert not ClusterMember.objects.exists()


@pytest.mark.parametrize("reachable", [True, False])
def test_a_name_is_taken_whatever_the_members_state(joined, reachable: bool) -> None:
    member, _secret = joined("member1")
    ClusterMember.objects.filter(pk=member.pk).update(reachable=reachable, healthy=False)
    _row, token = services.join_token_create(user="admin")
    with pytest.raises(plumbing.JoinRefused, match="taken"):
        services.member_join(node="member1", token_hash=signing.token_hash(token), info={})
    assert ClusterMember.objects.get().secret_hash == member.secret_hash


def test_other_names_still_join_beside_a_member(joined) -> None:
    joined("member1")
    member, _secret = joined("member2")
    assert member.node == "member2"
    assert ClusterMember.objects.count() == 2


def test_the_join_task_passes_the_senders_origin(joined) -> None:
    joined("member1")
    _row, token = services.join_token_create(user="admin")
    request = join_request(token, info={"hostname": "mx9"})
    result = tasks.member_join.apply(args=(request,))
    assert result.get() is False
    assert Event.objects.filter(message__contains="hostname mx9").exists()


def test_a_joined_member_refused_a_rejoin_stays_joined_with_its_secret(member_role: str) -> None:
    member_joins("t" * 32, secret="s3cret")
    member_services.cluster_join_request(token="u" * 32, user="admin")
    link = member_services.join_answer_receive(
        message=join_answer(
            "u" * 32,
            accepted=False,
            message="the node name member1 is taken by a member of this cluster",
        )
    )
    assert link is not None and link.state == JoinState.JOINED and link.secret == "s3cret"
    assert "taken" in link.error


def test_celery_shows_join_tokens_and_secrets_masked() -> None:
    key = signing.join_key("t" * 32)
    request = signing.seal(key, kind="member_join", sender="m1", recipient="c",
                           body={"token": signing.token_hash("t" * 32), "info": {}})  # fmt: skip
    answer_ = join_answer("t" * 32, secret="s3cr3t", node="m1", central="c")
    report_ = report_message("m1", "s3cr3t")
    update = from_central("s3cr3t", "central_update", {"firmware": "2.8.0.0", "events_cursor": 5})
    join = plumbing.Outgoing("cluster.tasks.member_join", (request,), "q")
    answer = plumbing.Outgoing("cluster.tasks.join_answer", (answer_,), "q")
    reported = plumbing.Outgoing("cluster.tasks.member_report", (report_,), "q")
    updated = plumbing.Outgoing("cluster.tasks.central_update", (update,), "q")
    assert signing.token_hash("t" * 32) not in join.argsrepr() and "'m1'" in join.argsrepr()
    assert answer_["body"]["secret"] not in answer.argsrepr()
    for shown, message in ((join, request), (answer, answer_), (reported, report_)):
        assert message["mac"] not in shown.argsrepr()
        assert "s3cr3t" not in shown.argsrepr() and key not in shown.argsrepr()
    assert "'events_cursor': 5" in updated.argsrepr()


def test_a_members_secret_is_on_no_page_event_or_api_answer(admin_client, joined, settings) -> None:
    member, secret = joined("member1")
    receive_report("member1", secret)
    shown = [
        admin_client.get(reverse("cluster:index")).content.decode(),
        admin_client.get(reverse("cluster:member_remove", args=["member1"])).content.decode(),
        admin_client.get("/api/v1/cluster").content.decode(),
        admin_client.get("/api/v1/events").content.decode(),
    ]
    for text in shown:
        assert secret not in text and member.secret_hash not in text
    for event in Event.objects.all():
        assert secret not in event.message and secret not in str(event.details)
    # On the member: the link's secret is not on its page or in its API answer either.
    settings.CLUSTER_ROLE = "member"
    settings.NODE_NAME = "member1"
    settings.CLUSTER_CENTRAL = "central"
    CentralLink.objects.create(pk=1, central="central", state=JoinState.JOINED, secret=secret)
    assert secret not in admin_client.get(reverse("cluster:index")).content.decode()
    assert secret not in admin_client.get("/api/v1/cluster").content.decode()
