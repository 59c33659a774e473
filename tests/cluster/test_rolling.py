"""The rolling upgrade's state machine on Central, driven by members' reports (and beat):
Central first, then each member one at a time; the first failure stops it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from cluster import services
from cluster.models import CentralLink, ClusterMember, ClusterUpgrade, NodeStep, UpgradeState
from events.models import Event
from tests.cluster.conftest import report, set_firmware

NEW = "2.8.1.0"


def sends(captured) -> list[tuple[str, str, tuple]]:
    return [(c.task, c.queue, c.args) for c in captured if isinstance(c, services.Outgoing)]


@pytest.fixture
def cluster(joined) -> dict[str, str]:
    """Central already on 2.8.1.0 (its step is skipped), two members on 2.8.0.0."""
    set_firmware(NEW)
    secrets = {}
    for node in ("member1", "member2"):
        _member, secrets[node] = joined(node)
    return secrets


def send_report(secrets, node: str, upgrade: ClusterUpgrade | None = None, **kwargs) -> None:
    services.member_report_receive(node=node, secret=secrets[node], report=report(**kwargs),
                                   events=[])  # fmt: skip


def answer(upgrade: ClusterUpgrade, run_id: int | None = 11, error: str = "") -> dict:
    return {"upgrade_id": upgrade.pk, "run_id": run_id, "error": error}


def install(state: str, run_id: int = 11, phase: int = 4) -> dict:
    return {"run_id": run_id, "state": state, "phase": phase, "percent": 40.0, "version": NEW}


def test_it_upgrades_members_one_at_a_time_as_their_reports_arrive(
    cluster, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks() as captured:
        upgrade = services.cluster_upgrade_start(user="admin")
    assert upgrade.order == ["central", "member1", "member2"] and upgrade.version == NEW
    assert upgrade.results["central"]["state"] == NodeStep.SKIPPED
    assert upgrade.current_node == "member1"
    assert [(t, q) for t, q, _ in sends(captured)] == [
        ("cluster.tasks.node_install_start", "lmi.node.member1")
    ]
    assert sends(captured)[0][2] == (upgrade.pk, NEW, "central", NEW)

    # A report from before the member handled the request changes nothing.
    send_report(cluster, "member1")
    upgrade.refresh_from_db()
    assert upgrade.results["member1"]["state"] == NodeStep.REQUESTED
    # Installing, then succeeded but still reporting the old level: not done yet.
    send_report(cluster, "member1", install=install("running"), answer=answer(upgrade))
    upgrade.refresh_from_db()
    assert upgrade.results["member1"]["state"] == NodeStep.INSTALLING
    assert upgrade.results["member1"]["percent"] == 40.0
    send_report(cluster, "member1", install=install("succeeded"), answer=answer(upgrade),
                healthy=False, firmware=NEW)  # fmt: skip
    upgrade.refresh_from_db()
    assert upgrade.current_node == "member1"
    # The member 2 never heard of it until member 1 is healthy on the new version.
    with django_capture_on_commit_callbacks() as captured:
        send_report(cluster, "member1", install=install("succeeded"), answer=answer(upgrade),
                    firmware=NEW)  # fmt: skip
    upgrade.refresh_from_db()
    assert upgrade.results["member1"]["state"] == NodeStep.DONE
    assert upgrade.current_node == "member2"
    assert ("cluster.tasks.node_install_start", "lmi.node.member2") in [
        (t, q) for t, q, _ in sends(captured)
    ]
    send_report(cluster, "member2", install=install("succeeded", run_id=3),
                answer=answer(upgrade, run_id=3), firmware=NEW)  # fmt: skip
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.SUCCEEDED and upgrade.finished_at is not None
    assert Event.objects.filter(message=f"Cluster upgrade to {NEW} complete").exists()


def test_it_stops_at_the_first_failure(cluster, django_capture_on_commit_callbacks) -> None:
    upgrade = services.cluster_upgrade_start(user="admin")
    send_report(cluster, "member1", install=install("rolled_back"), answer=answer(upgrade))
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED and upgrade.stopped_node == "member1"
    assert "rolled_back" in upgrade.error
    assert upgrade.results["member2"]["state"] == NodeStep.PENDING
    # Nothing moves after a stop, whatever arrives.
    with django_capture_on_commit_callbacks() as captured:
        send_report(cluster, "member1", install=install("succeeded"), answer=answer(upgrade),
                    firmware=NEW)  # fmt: skip
        services.central_tick()
    assert not [s for s in sends(captured) if s[0] == "cluster.tasks.node_install_start"]
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED
    assert Event.objects.filter(message__contains="stopped at member1").exists()


def test_a_member_that_refuses_stops_the_upgrade_with_its_reason(cluster) -> None:
    upgrade = services.cluster_upgrade_start(user="admin")
    send_report(cluster, "member1", answer=answer(upgrade, run_id=None, error="no firmware ready"))
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED
    assert upgrade.error == "member1: refused: no firmware ready"


def test_a_member_already_on_the_version_is_skipped(cluster) -> None:
    send_report(cluster, "member1", firmware=NEW)
    upgrade = services.cluster_upgrade_start(user="admin")
    assert upgrade.results["member1"]["state"] == NodeStep.SKIPPED
    assert upgrade.current_node == "member2"


def test_a_silent_member_times_out_on_beat(cluster, settings) -> None:
    settings.CLUSTER_NODE_UPGRADE_TIMEOUT = 60
    upgrade = services.cluster_upgrade_start(user="admin")
    services.central_tick()
    assert ClusterUpgrade.objects.get().state == UpgradeState.RUNNING
    ClusterUpgrade.objects.filter(pk=upgrade.pk).update(
        step_started_at=timezone.now() - timedelta(seconds=61)
    )
    services.central_tick()
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED and "no result within 60 s" in upgrade.error


def test_it_refuses_to_start_with_an_unreachable_member(cluster) -> None:
    ClusterMember.objects.filter(node="member2").update(reachable=False)
    with pytest.raises(services.ClusterError, match="member2 is unreachable"):
        services.cluster_upgrade_start(user="admin")
    assert not ClusterUpgrade.objects.exists()


def test_it_refuses_a_second_upgrade_and_an_empty_one(cluster) -> None:
    services.cluster_upgrade_start(user="admin")
    with pytest.raises(services.ClusterError, match="already running"):
        services.cluster_upgrade_start(user="admin")
    ClusterUpgrade.objects.update(state=UpgradeState.STOPPED)
    ClusterMember.objects.update(firmware_version=NEW)
    with pytest.raises(services.ClusterError, match="nothing to upgrade"):
        services.cluster_upgrade_start(user="admin")


def test_only_central_upgrades_the_cluster(member_role) -> None:
    with pytest.raises(services.ClusterError, match="Cluster Central"):
        services.cluster_upgrade_start(user="admin")


def _central_run(state: str):
    from upgrades.models import Download, InstallRun

    download = Download.objects.create(version=NEW, url="http://x/b", size=1, sha256="0" * 64,
                                       state="ready", trigger="user")  # fmt: skip
    return InstallRun.objects.create(download=download, version=NEW, from_version="2.8.0.0",
                                     state=state, phase=5, trigger="cluster")  # fmt: skip


def _upgrade_on_central_step(run_id: int) -> ClusterUpgrade:
    return ClusterUpgrade.objects.create(
        version=NEW, order=["central", "member1"], current_node="central",
        step_started_at=timezone.now(),
        results={"central": {"state": NodeStep.INSTALLING, "run_id": run_id},
                 "member1": {"state": NodeStep.PENDING}},
    )  # fmt: skip


def test_central_step_waits_for_its_own_run_then_sends_the_first_member(
    joined, django_capture_on_commit_callbacks
) -> None:
    pytest.importorskip("upgrades.install")
    joined("member1")
    run = _central_run("running")
    upgrade = _upgrade_on_central_step(run.pk)
    services.cluster_upgrade_advance()
    upgrade.refresh_from_db()
    assert upgrade.current_node == "central" and upgrade.results["central"]["phase"] == 5
    type(run).objects.filter(pk=run.pk).update(state="succeeded")
    set_firmware(NEW)
    with django_capture_on_commit_callbacks() as captured:
        services.cluster_upgrade_advance()
    upgrade.refresh_from_db()
    assert upgrade.results["central"]["state"] == NodeStep.DONE
    assert upgrade.current_node == "member1"
    assert [(t, q) for t, q, _ in sends(captured)] == [
        ("cluster.tasks.node_install_start", "lmi.node.member1")
    ]


def test_central_rolled_back_stops_before_any_member(joined) -> None:
    pytest.importorskip("upgrades.install")
    joined("member1")
    run = _central_run("rolled_back")
    type(run).objects.filter(pk=run.pk).update(error="health check: SMTP down")
    upgrade = _upgrade_on_central_step(run.pk)
    services.cluster_upgrade_advance()
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED and upgrade.stopped_node == "central"
    assert "SMTP down" in upgrade.error
    assert upgrade.results["member1"]["state"] == NodeStep.PENDING


def test_member_answers_an_install_request_once_and_says_why_not(
    member_role, django_capture_on_commit_callbacks
) -> None:
    services.cluster_join_request(token="t" * 32, user="admin")
    services.join_answer_receive(central="central", accepted=True, message="", secret="s",
                                 firmware="2.8.0.0")  # fmt: skip
    for _ in range(2):  # delivered twice
        services.member_install_start(upgrade_id=9, version=NEW, central="central",
                                      central_firmware=NEW)  # fmt: skip
    link = CentralLink.objects.get()
    assert link.upgrade_id == 9 and link.upgrade_run_id is None
    assert "no firmware download is ready on member1" in link.upgrade_error
    assert link.central_firmware == NEW
    assert Event.objects.filter(message__contains="asked for firmware").count() == 1
    report_data, _events = services.member_report_build()
    assert report_data["cluster_upgrade"]["upgrade_id"] == 9


def test_member_ignores_install_requests_from_another_central(member_role) -> None:
    services.cluster_join_request(token="t" * 32, user="admin")
    services.join_answer_receive(central="central", accepted=True, message="", secret="s",
                                 firmware="2.8.0.0")  # fmt: skip
    assert services.member_install_start(upgrade_id=1, version=NEW, central="rogue",
                                         central_firmware="9.9") is None  # fmt: skip
    assert CentralLink.objects.get().upgrade_id is None
