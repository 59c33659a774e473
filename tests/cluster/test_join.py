"""Join tokens and joins on Cluster Central; the member's side of the join."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from cluster import member_services, plumbing, services, signing
from cluster.models import CentralLink, ClusterMember, JoinState, JoinToken
from events.models import Category, Event
from tests.cluster.conftest import join_answer, join_request, member_joins, sent_message


def test_token_is_stored_hashed_and_valid_for_a_day(central: str) -> None:
    row, token = services.join_token_create(user="admin")
    assert token not in row.token_hash and len(row.token_hash) == 64
    assert token not in row.key and row.key == signing.join_key(token) != row.token_hash
    assert timedelta(hours=23, minutes=59) < row.expires_at - timezone.now() <= timedelta(hours=24)
    assert not Event.objects.filter(message__contains=token).exists()


def test_a_token_never_starts_with_a_dash_so_the_command_line_takes_it(
    central: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = iter(["-starts-like-an-option", "-again", "good-token"])
    monkeypatch.setattr(services.secrets, "token_urlsafe", lambda _n: next(drawn))
    _row, token = services.join_token_create(user="admin")
    assert token == "good-token"


def test_it_joins_with_a_good_token_and_answers_the_member(
    central: str, django_capture_on_commit_callbacks
) -> None:
    _row, token = services.join_token_create(user="admin")
    request = join_request(token, info={"hostname": "mx2", "firmware": "2.8.0.0"})
    with django_capture_on_commit_callbacks() as sent:
        assert services.join_request_receive(message=request)
    member = ClusterMember.objects.get(node="member1")
    assert member.firmware_version == "2.8.0.0" and member.hostname == "mx2"
    message = sent_message(sent, "join_answer", sender="central", recipient="member1")
    opened = signing.open_sealed(
        message, kind="join_answer", recipient="member1", key=lambda *_: signing.join_key(token)
    )
    assert opened.sender == "central" and opened.body["accepted"] is True
    assert opened.body["firmware"] == "2.8.0.0"
    secret = signing.secret_decrypt(signing.join_key(token), opened.body["secret"])
    assert member.secret_hash == signing.member_key(secret)
    assert Event.objects.filter(category=Category.CLUSTER, message="member1 joined the cluster")


def test_the_join_answer_on_the_wire_does_not_carry_the_member_secret_in_clear(
    central: str, django_capture_on_commit_callbacks
) -> None:
    _row, token = services.join_token_create(user="admin")
    with django_capture_on_commit_callbacks() as sent:
        services.join_request_receive(message=join_request(token))
    (answer,) = [c for c in sent if isinstance(c, plumbing.Outgoing)]
    # What goes to Redis: the task's arguments as JSON (and Celery's argsrepr for its logs).
    wire = json.dumps(answer.args) + answer.argsrepr()
    member = ClusterMember.objects.get()
    secret = signing.secret_decrypt(signing.join_key(token), answer.args[0]["body"]["secret"])
    assert member.secret_hash == signing.member_key(secret)
    assert secret not in wire and member.secret_hash not in wire
    assert token not in wire and signing.join_key(token) not in wire


def test_the_join_request_on_the_wire_carries_neither_the_token_nor_its_key(
    member_role: str, django_capture_on_commit_callbacks
) -> None:
    token = "t" * 32
    with django_capture_on_commit_callbacks() as sent:
        member_services.cluster_join_request(token=token, user="admin")
    (request,) = [c for c in sent if isinstance(c, plumbing.Outgoing)]
    wire = json.dumps(request.args) + request.argsrepr()
    assert token not in wire and signing.join_key(token) not in wire
    assert request.args[0]["body"]["token"] == signing.token_hash(token)
    assert signing.token_hash(token) not in request.argsrepr()
    assert CentralLink.objects.get().join_key == signing.join_key(token)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m: m.pop("mac"), id="unsigned"),
        pytest.param(lambda m: m.update(mac="0" * 64), id="wrong-mac"),
        pytest.param(lambda m: m["body"].update(info={"hostname": "evil"}), id="altered"),
        pytest.param(lambda m: m.update({"from": "member2"}), id="other-name"),
    ],
)
def test_a_join_request_not_signed_with_the_tokens_key_is_refused_unanswered(
    central: str, django_capture_on_commit_callbacks, tamper
) -> None:
    row, token = services.join_token_create(user="admin")
    request = join_request(token)
    tamper(request)
    with django_capture_on_commit_callbacks() as sent:
        assert not services.join_request_receive(message=request, origin="gen1@mx9")
    assert not ClusterMember.objects.exists() and not sent
    assert JoinToken.objects.get(pk=row.pk).used_at is None  # the token is not spent
    event = Event.objects.get(message__startswith="Refused a join request")
    assert "gen1@mx9" in event.message and token not in str(event.details)


def test_a_join_request_with_an_unknown_token_is_refused(central: str) -> None:
    services.join_token_create(user="admin")
    assert not services.join_request_receive(message=join_request("u" * 32))
    assert not ClusterMember.objects.exists()
    assert Event.objects.filter(
        message="Refused a join request from 'member1': the join token is not valid"
    ).exists()


def test_a_replayed_join_request_is_refused(
    central: str, django_capture_on_commit_callbacks
) -> None:
    _row, token = services.join_token_create(user="admin")
    request = join_request(token)
    assert services.join_request_receive(message=request)
    ClusterMember.objects.all().delete()  # even with the name free again
    with django_capture_on_commit_callbacks() as sent:
        assert not services.join_request_receive(message=request)
    assert not ClusterMember.objects.exists() and not sent
    assert Event.objects.filter(message__contains="it was received before").count() == 1


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("x" * 64, "not valid"),
        ("short", "not valid"),
        (signing.token_hash("never issued " * 3), "not valid"),
    ],
)
def test_it_refuses_a_wrong_token(central: str, token: str, reason: str) -> None:
    with pytest.raises(plumbing.JoinRefused, match=reason):
        services.member_join(node="member1", token_hash=token, info={})
    assert not ClusterMember.objects.exists()
    assert Event.objects.filter(message__startswith="Refused a join request").count() == 1


def test_it_refuses_an_expired_token(central: str) -> None:
    row, token = services.join_token_create(user="admin")
    JoinToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(plumbing.JoinRefused, match="expired"):
        services.member_join(node="member1", token_hash=signing.token_hash(token), info={})
    assert not ClusterMember.objects.exists()


def test_a_token_is_single_use(central: str) -> None:
    _row, token = services.join_token_create(user="admin")
    services.member_join(node="member1", token_hash=signing.token_hash(token), info={})
    with pytest.raises(plumbing.JoinRefused, match="already used"):
        services.member_join(node="member2", token_hash=signing.token_hash(token), info={})
    assert list(ClusterMember.objects.values_list("node", flat=True)) == ["member1"]


@pytest.mark.parametrize("node", ["central", "../etc", "", "a" * 65, "mem ber"])
def test_it_refuses_bad_or_clashing_node_names(central: str, node: str) -> None:
    _row, token = services.join_token_create(user="admin")
    with pytest.raises(plumbing.JoinRefused):
        services.member_join(node=node, token_hash=signing.token_hash(token), info={})
    assert not ClusterMember.objects.exists()
    assert JoinToken.objects.get().used_at is None


def test_a_refused_join_is_answered_signed_and_only_to_a_valid_node_name(
    central: str, django_capture_on_commit_callbacks
) -> None:
    _row, token = services.join_token_create(user="admin")
    with django_capture_on_commit_callbacks() as sent:
        assert not services.join_request_receive(message=join_request(token, node="central"))
        assert not services.join_request_receive(message=join_request(token, node="bad name"))
    out = [c for c in sent if isinstance(c, plumbing.Outgoing)]
    assert [c.queue for c in out] == ["lmi.node.central"]
    opened = signing.open_sealed(
        out[0].args[0], kind="join_answer", recipient="central",
        key=lambda *_: signing.join_key(token),
    )  # fmt: skip
    assert opened.body["accepted"] is False and opened.body["secret"] == ""
    assert "Central's own node name" in opened.body["message"]


def test_tokens_are_created_only_on_central(member_role: str) -> None:
    with pytest.raises(plumbing.ClusterError, match="Cluster Central"):
        services.join_token_create(user="admin")


def test_member_join_request_goes_to_centrals_queue(
    member_role: str, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks() as sent:
        member_services.cluster_join_request(token="t" * 32, user="admin")
    sent_message(sent, "member_join", sender="member1", recipient="central")
    assert CentralLink.objects.get().state == JoinState.PENDING


def test_member_refuses_a_malformed_token_and_changes_nothing(member_role: str) -> None:
    with pytest.raises(plumbing.ClusterError, match="not a join token"):
        member_services.cluster_join_request(token="<script>", user="admin")
    assert not CentralLink.objects.exists()


def test_member_records_centrals_answer_only_when_it_asked(member_role: str) -> None:
    assert member_services.join_answer_receive(message=join_answer("t" * 32, secret="s")) is None
    assert Event.objects.filter(message__contains="no join request of this node is waiting")
    link = member_joins("t" * 32, secret="s3cret", firmware="2.8.1.0")
    assert link is not None and link.state == JoinState.JOINED
    assert link.central_firmware == "2.8.1.0" and link.secret == "s3cret"
    assert link.join_key == ""  # the join's key is forgotten with the answer


def test_member_refuses_an_answer_signed_with_another_token(member_role: str) -> None:
    member_services.cluster_join_request(token="t" * 32, user="admin")
    assert member_services.join_answer_receive(message=join_answer("u" * 32)) is None
    link = CentralLink.objects.get()
    assert link.state == JoinState.PENDING and link.secret == ""
    assert Event.objects.filter(message__startswith="Refused a join answer from 'central'")
    # The genuine answer still lands.
    answer = member_services.join_answer_receive(message=join_answer("t" * 32, secret="s3cret"))
    assert answer is not None and answer.state == JoinState.JOINED and answer.secret == "s3cret"


def test_member_refuses_an_answer_from_another_central(member_role: str) -> None:
    member_services.cluster_join_request(token="t" * 32, user="admin")
    assert (
        member_services.join_answer_receive(message=join_answer("t" * 32, central="rogue")) is None
    )
    assert CentralLink.objects.get().state == JoinState.PENDING


def test_member_shows_a_refusal(member_role: str) -> None:
    member_services.cluster_join_request(token="t" * 32, user="admin")
    link = member_services.join_answer_receive(
        message=join_answer("t" * 32, accepted=False, message="the join token has expired")
    )
    assert link.state == JoinState.REFUSED and "expired" in link.error


def test_a_join_over_the_wire_gives_both_nodes_one_key(
    settings, demo_appliance, db, django_capture_on_commit_callbacks
) -> None:
    """The member's request through Central's receive service and back: the member ends up
    with a secret whose key is the one Central stores (one database plays both nodes)."""
    settings.CLUSTER_ROLE, settings.NODE_NAME = "central", "central"
    _row, token = services.join_token_create(user="admin")
    settings.CLUSTER_ROLE, settings.NODE_NAME = "member", "member1"
    settings.CLUSTER_CENTRAL = "central"
    with django_capture_on_commit_callbacks() as sent:
        member_services.cluster_join_request(token=token, user="admin")
    (request,) = [c for c in sent if isinstance(c, plumbing.Outgoing)]
    settings.CLUSTER_ROLE, settings.NODE_NAME = "central", "central"
    with django_capture_on_commit_callbacks() as sent:
        assert services.join_request_receive(message=request.args[0])
    (answer,) = [c for c in sent if isinstance(c, plumbing.Outgoing)]
    settings.CLUSTER_ROLE, settings.NODE_NAME = "member", "member1"
    link = member_services.join_answer_receive(message=answer.args[0])
    assert link is not None and link.state == JoinState.JOINED
    assert signing.member_key(link.secret) == ClusterMember.objects.get().secret_hash
