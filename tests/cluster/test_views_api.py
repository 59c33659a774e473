"""The Cluster page and /api/v1/cluster."""

from __future__ import annotations

import json

from django.urls import reverse

from cluster.models import ClusterUpgrade, JoinToken
from tests.cluster.conftest import receive_report, set_firmware


def csrf(client) -> dict[str, str]:
    client.get(reverse("cluster:index"))
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def test_standalone_page_explains_the_roles(admin_client, demo_appliance) -> None:
    response = admin_client.get(reverse("cluster:index"))
    assert response.status_code == 200
    assert b"Standalone" in response.content and b"LMI_CLUSTER_ROLE" in response.content


def test_central_page_lists_members_and_mixed_versions(admin_client, joined) -> None:
    _member, secret = joined("member1")
    set_firmware("2.8.1.0")
    receive_report("member1", secret)
    page = admin_client.get(reverse("cluster:index")).content.decode()
    assert 'data-testid="member-member1"' in page and "Healthy" in page
    assert "1 of 2 nodes run 2.8.1.0" in page


def test_token_is_shown_once_and_read_only_users_cannot_create_one(
    admin_client, readonly_client, central
) -> None:
    response = admin_client.post(reverse("cluster:token_create"), **csrf(admin_client))
    token = response.context["new_token"]
    assert token in response.content.decode()
    assert token not in admin_client.get(reverse("cluster:index")).content.decode()
    refused = readonly_client.post(reverse("cluster:token_create"), **csrf(readonly_client))
    assert refused.status_code == 403
    assert JoinToken.objects.count() == 1


def test_upgrade_button_asks_first_then_starts_the_rolling_upgrade(
    admin_client, readonly_client, joined
) -> None:
    joined("member1")
    set_firmware("2.8.1.0")
    assert (
        'data-testid="upgrade-cluster"'
        in admin_client.get(reverse("cluster:index")).content.decode()
    )
    page = admin_client.get(reverse("cluster:upgrade")).content.decode()
    assert "2. member1 (Member)" in page and "The first failure stops the upgrade" in page
    assert 'data-testid="upgrade-cluster-confirm"' in page
    assert not ClusterUpgrade.objects.exists()  # looking starts nothing
    read_only = readonly_client.get(reverse("cluster:upgrade")).content.decode()
    assert "an administrator upgrades the cluster" in read_only
    assert 'data-testid="upgrade-cluster-confirm"' not in read_only
    response = admin_client.post(reverse("cluster:upgrade"), follow=True, **csrf(admin_client))
    assert b"Upgrading the cluster to 2.8.1.0" in response.content
    assert ClusterUpgrade.objects.get().current_node == "member1"
    partial = admin_client.get(reverse("cluster:progress")).content.decode()
    assert "hx-trigger" in partial and "member1" in partial


def test_member_join_form_refuses_garbage(admin_client, member_role) -> None:
    response = admin_client.post(
        reverse("cluster:join"), {"token": "<x>"}, follow=True, **csrf(admin_client)
    )
    assert b"not a join token" in response.content


def test_api_reads_and_creates_tokens(admin_client, readonly_client, joined) -> None:
    joined("member1")
    data = admin_client.get("/api/v1/cluster").json()
    assert data["role"] == "central" and data["members"][0]["node"] == "member1"
    token = csrf(admin_client)
    created = admin_client.post("/api/v1/cluster/tokens", **token)
    assert created.status_code == 201 and len(created.json()["token"]) >= 16
    ro = csrf(readonly_client)
    assert readonly_client.post("/api/v1/cluster/tokens", **ro).status_code == 403
    # Central on 2.8.0.0 with nothing downloaded and every member on 2.8.0.0: nothing to do.
    refused = admin_client.post("/api/v1/cluster/upgrade", **token)
    assert refused.status_code == 409 and "nothing to upgrade" in json.dumps(refused.json())
    set_firmware("2.8.1.0")
    started = admin_client.post("/api/v1/cluster/upgrade", **token)
    assert started.status_code == 202 and started.json()["current_node"] == "member1"


def test_no_upgrade_is_offered_when_every_node_runs_the_firmware(admin_client, joined) -> None:
    joined("member1", firmware="2.8.1.0")
    set_firmware("2.8.1.0")
    page = admin_client.get(reverse("cluster:index")).content.decode()
    assert 'data-testid="upgrade-cluster"' not in page
    assert "Every node runs firmware 2.8.1.0: nothing to upgrade." in page


def test_a_finished_node_reads_100_percent_not_its_last_phase_seen(db) -> None:
    upgrade = ClusterUpgrade(
        version="2.8.1.0",
        order=["central", "member1"],
        results={
            "central": {"state": "done", "percent": 20.0, "phase": 2},
            "member1": {"state": "installing", "percent": 40.0, "phase": 4},
        },
    )
    central, member = upgrade.steps()
    assert (central["label"], central["percent"], central["phase"]) == ("Upgraded", 100.0, None)
    assert (member["percent"], member["phase"]) == (40.0, 4)


def test_each_member_is_told_by_its_own_update_story(admin_client, joined, demo_appliance) -> None:
    from cluster import plumbing
    from cluster.models import ClusterMember
    from tests.cluster.conftest import report

    _member, secret = joined("member1")
    story = "Up to date: firmware 2.8.1.0 installed on 2026-12-05 00:40 UTC by admin."
    install = {"state": "succeeded", "version": "2.8.1.0", "stage": "installed", "story": story}
    receive_report("member1", secret, report("2.8.1.0", install=install))
    page = admin_client.get(reverse("cluster:index")).content.decode()
    assert f'data-testid="member-story">{story}<' in page

    hostile = {**install, "story": "x\x1b[2Jy", "stage": "Installed; DROP"}
    receive_report("member1", secret, report("2.8.1.0", install=hostile))
    kept = ClusterMember.objects.get(node="member1").install
    assert "story" not in kept and "stage" not in kept
    assert plumbing.local_install()["stage"] in ("up_to_date", "available", "installed")
