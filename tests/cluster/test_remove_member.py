"""Remove member: a confirmation that says what happens, administrators only, a conditional
delete with an event, the member told; then its name joins again with a new token."""

from __future__ import annotations

import pytest
from django.urls import reverse

from cluster import member_services, plumbing, rolling, services
from cluster.models import CentralLink, ClusterMember, JoinState
from events.models import Event, Severity
from tests.cluster.conftest import (
    from_central,
    member_joins,
    receive_report,
    sent_message,
    set_firmware,
)


def csrf(client) -> dict[str, str]:
    client.get(reverse("cluster:index"))
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def remove_url(node: str = "member1") -> str:
    return reverse("cluster:member_remove", args=[node])


def test_the_confirmation_says_what_removing_does(admin_client, joined) -> None:
    joined("member1")
    page = admin_client.get(reverse("cluster:index")).content.decode()
    assert 'data-testid="remove-member1"' in page
    confirm = admin_client.get(remove_url())
    text = confirm.content.decode()
    assert confirm.status_code == 200
    assert "its secret" in text and "its latest report" in text
    assert "keeps running" in text and "new</strong> join token" in text
    assert 'data-testid="remove-member-confirm"' in text
    # Looking at the confirmation changes nothing.
    assert ClusterMember.objects.filter(node="member1").exists()


def test_the_confirmation_warns_when_a_running_upgrade_still_has_the_member(
    admin_client, joined
) -> None:
    joined("member1")
    set_firmware("2.8.1.0")
    rolling.cluster_upgrade_start(user="admin")
    text = admin_client.get(remove_url()).content.decode()
    assert 'data-testid="remove-upgrade-notice"' in text


def test_an_administrator_removes_a_member_with_an_event_and_the_member_is_told(
    admin_client, joined, django_capture_on_commit_callbacks
) -> None:
    joined("member1")
    with django_capture_on_commit_callbacks(execute=False) as sent:
        response = admin_client.post(remove_url(), **csrf(admin_client))
    assert response.status_code == 302
    assert not ClusterMember.objects.exists()
    event = Event.objects.get(message__startswith="Removed member1 from the cluster")
    assert event.username == "admin" and event.severity == Severity.WARNING
    sent_message(sent, "member_removed", sender="central", recipient="member1")
    page = admin_client.get(reverse("cluster:index")).content.decode()
    assert "Removed member1 from the cluster" in page


def test_after_removal_the_name_joins_again_with_a_new_token(joined) -> None:
    _member, old_secret = joined("member1")
    services.member_remove(node="member1", user="admin")
    member, new_secret = joined("member1")
    assert member.node == "member1" and new_secret != old_secret
    assert receive_report("member1", old_secret) is None
    assert receive_report("member1", new_secret)
    assert Event.objects.filter(message="member1 joined the cluster").count() == 2


def test_read_only_users_see_no_remove_button_and_cannot_remove(readonly_client, joined) -> None:
    joined("member1")
    page = readonly_client.get(reverse("cluster:index")).content.decode()
    assert 'data-testid="member-member1"' in page and "remove-member1" not in page
    confirm = readonly_client.get(remove_url()).content.decode()
    assert "remove-member-confirm" not in confirm and "read-only" in confirm
    refused = readonly_client.post(remove_url(), **csrf(readonly_client))
    assert refused.status_code == 403
    assert ClusterMember.objects.filter(node="member1").exists()
    assert not Event.objects.filter(message__startswith="Removed").exists()


def test_removing_a_node_that_is_not_a_member_says_so(admin_client, joined) -> None:
    joined("member1")
    assert admin_client.get(remove_url("member9")).status_code == 404
    response = admin_client.post(remove_url("member9"), follow=True, **csrf(admin_client))
    assert b"member9 is not a member of this cluster" in response.content
    services.member_remove(node="member1", user="admin")
    # A second removal (another administrator, a double click) finds nothing and writes nothing.
    with pytest.raises(plumbing.NotAMember):
        services.member_remove(node="member1", user="admin")
    assert Event.objects.filter(message__startswith="Removed member1").count() == 1


def test_members_are_removed_only_on_central(member_role: str) -> None:
    with pytest.raises(plumbing.ClusterError, match="Cluster Central"):
        services.member_remove(node="member1", user="admin")


def test_the_api_removes_a_member_for_administrators_only(
    admin_client, readonly_client, joined
) -> None:
    joined("member1")
    ro = csrf(readonly_client)
    assert readonly_client.delete("/api/v1/cluster/members/member1", **ro).status_code == 403
    token = csrf(admin_client)
    assert admin_client.delete("/api/v1/cluster/members/member1", **token).status_code == 204
    assert not ClusterMember.objects.exists()
    assert admin_client.delete("/api/v1/cluster/members/member1", **token).status_code == 404


def test_a_removed_member_forgets_its_secret_and_offers_the_join_form(
    member_role: str, admin_client
) -> None:
    member_joins("t" * 32, secret="s3cret")
    CentralLink.objects.filter(pk=1).update(events_acked=42)
    # A notice from some other Central is refused, even signed with our key.
    assert member_services.member_removed_receive(
        message=from_central("s3cret", "member_removed", {}, central="elsewhere")
    ) is None  # fmt: skip
    link = member_services.member_removed_receive(
        message=from_central("s3cret", "member_removed", {})
    )
    assert link is not None and link.state == JoinState.NOT_JOINED and link.secret == ""
    assert "removed this node" in link.error
    assert not member_services.member_report_send()  # no more reports to a Central that forgot us
    assert 'data-testid="join"' in admin_client.get(reverse("cluster:index")).content.decode()
    assert Event.objects.filter(
        message="Cluster Central central removed this node from the cluster"
    )
    # Joining the same Central again does not send it the events it already stored.
    link = member_joins("u" * 32, secret="n3w")
    assert link is not None and link.state == JoinState.JOINED and link.secret == "n3w"
    assert link.events_acked == 42


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda: ["central"], id="old-arguments"),
        pytest.param(lambda: from_central("wrong", "member_removed", {}), id="wrong-key"),
        pytest.param(
            lambda: {**from_central("s3cret", "member_removed", {}), "mac": "0" * 64},
            id="wrong-mac",
        ),
        pytest.param(lambda: from_central("s3cret", "central_update", {}), id="other-kind"),
    ],
)
def test_a_forged_removal_notice_cuts_nobody_off(member_role: str, forge) -> None:
    member_joins("t" * 32, secret="s3cret")
    assert member_services.member_removed_receive(message=forge()) is None
    link = CentralLink.objects.get()
    assert link.state == JoinState.JOINED and link.secret == "s3cret"
    event = Event.objects.get(message__startswith="Refused a removal notice")
    assert event.severity == Severity.WARNING
