"""Join tokens and joins on Cluster Central; the member's side of the join."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from cluster import services
from cluster.models import CentralLink, ClusterMember, JoinState, JoinToken
from events.models import Category, Event


def test_token_is_stored_hashed_and_valid_for_a_day(central: str) -> None:
    row, token = services.join_token_create(user="admin")
    assert token not in row.token_hash and len(row.token_hash) == 64
    assert timedelta(hours=23, minutes=59) < row.expires_at - timezone.now() <= timedelta(hours=24)
    assert not Event.objects.filter(message__contains=token).exists()


def test_it_joins_with_a_good_token_and_answers_the_member(
    central: str, django_capture_on_commit_callbacks
) -> None:
    _row, token = services.join_token_create(user="admin")
    with django_capture_on_commit_callbacks() as sent:
        assert services.join_request_receive(
            node="member1", token=token, info={"hostname": "mx2", "firmware": "2.8.0.0"}
        )
    member = ClusterMember.objects.get(node="member1")
    assert member.firmware_version == "2.8.0.0" and member.hostname == "mx2"
    answer = [c for c in sent if isinstance(c, services.Outgoing)]
    assert [(c.task, c.queue) for c in answer] == [
        ("cluster.tasks.join_answer", "lmi.node.member1")
    ]
    _central, accepted, _message, secret, firmware = answer[0].args
    assert accepted and firmware == "2.8.0.0" and member.secret_hash == services._hash(secret)
    assert Event.objects.filter(category=Category.CLUSTER, message="member1 joined the cluster")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("x" * 32, "not valid"),
        ("short", "not valid"),
        ("bad token with spaces and more", "not valid"),
    ],
)
def test_it_refuses_a_wrong_token(central: str, token: str, reason: str) -> None:
    with pytest.raises(services.JoinRefused, match=reason):
        services.member_join(node="member1", token=token, info={})
    assert not ClusterMember.objects.exists()
    assert Event.objects.filter(message__startswith="Refused a join request").count() == 1


def test_it_refuses_an_expired_token(central: str) -> None:
    row, token = services.join_token_create(user="admin")
    JoinToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(services.JoinRefused, match="expired"):
        services.member_join(node="member1", token=token, info={})
    assert not ClusterMember.objects.exists()


def test_a_token_is_single_use(central: str) -> None:
    _row, token = services.join_token_create(user="admin")
    services.member_join(node="member1", token=token, info={})
    with pytest.raises(services.JoinRefused, match="already used"):
        services.member_join(node="member2", token=token, info={})
    assert list(ClusterMember.objects.values_list("node", flat=True)) == ["member1"]


@pytest.mark.parametrize("node", ["central", "../etc", "", "a" * 65, "mem ber"])
def test_it_refuses_bad_or_clashing_node_names(central: str, node: str) -> None:
    _row, token = services.join_token_create(user="admin")
    with pytest.raises(services.JoinRefused):
        services.member_join(node=node, token=token, info={})
    assert not ClusterMember.objects.exists()
    assert JoinToken.objects.get().used_at is None


def test_a_refused_join_is_answered_only_to_a_valid_node_name(
    central: str, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks() as sent:
        assert not services.join_request_receive(node="member1", token="y" * 30, info={})
        assert not services.join_request_receive(node="bad name", token="y" * 30, info={})
    queues = [c.queue for c in sent if isinstance(c, services.Outgoing)]
    assert queues == ["lmi.node.member1"]


def test_tokens_are_created_only_on_central(member_role: str) -> None:
    with pytest.raises(services.ClusterError, match="Cluster Central"):
        services.join_token_create(user="admin")


def test_member_join_request_goes_to_centrals_queue(
    member_role: str, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks() as sent:
        services.cluster_join_request(token="t" * 32, user="admin")
    out = [c for c in sent if isinstance(c, services.Outgoing)]
    assert [(c.task, c.queue) for c in out] == [("cluster.tasks.member_join", "lmi.node.central")]
    assert out[0].args[:2] == ("member1", "t" * 32)
    assert CentralLink.objects.get().state == JoinState.PENDING


def test_member_refuses_a_malformed_token_and_changes_nothing(member_role: str) -> None:
    with pytest.raises(services.ClusterError, match="not a join token"):
        services.cluster_join_request(token="<script>", user="admin")
    assert not CentralLink.objects.exists()


def test_member_records_centrals_answer_only_when_it_asked(member_role: str) -> None:
    assert (
        services.join_answer_receive(
            central="central", accepted=True, message="", secret="s", firmware="2.8.1.0"
        )
        is None
    )
    services.cluster_join_request(token="t" * 32, user="admin")
    link = services.join_answer_receive(
        central="central", accepted=True, message="", secret="s3cret", firmware="2.8.1.0"
    )
    assert link is not None and link.state == JoinState.JOINED
    assert link.central_firmware == "2.8.1.0" and link.secret == "s3cret"


def test_member_shows_a_refusal(member_role: str) -> None:
    services.cluster_join_request(token="t" * 32, user="admin")
    link = services.join_answer_receive(
        central="central", accepted=False, message="the join token has expired", secret="",
        firmware="",
    )  # fmt: skip
    assert link.state == JoinState.REFUSED and "expired" in link.error
