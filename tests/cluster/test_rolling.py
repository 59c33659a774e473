"""The rolling upgrade's state machine on Central, driven by members' reports (and beat):
Central first, then each member one at a time; the first failure stops it."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from cluster import member_services, plumbing, rolling, services, signing, tasks
from cluster.models import CentralLink, ClusterMember, ClusterUpgrade, NodeStep, UpgradeState
from events.models import Event, Severity
from tests.cluster.conftest import from_central, member_joins, receive_report, report, set_firmware

NEW = "2.8.1.0"


def sends(captured) -> list[tuple[str, str, tuple]]:
    return [(c.task, c.queue, c.args) for c in captured if isinstance(c, plumbing.Outgoing)]


@pytest.fixture
def cluster(joined) -> dict[str, str]:
    """Central already on 2.8.1.0 (its step is skipped), two members on 2.8.0.0."""
    set_firmware(NEW)
    secrets = {}
    for node in ("member1", "member2"):
        _member, secrets[node] = joined(node)
    return secrets


def send_report(secrets, node: str, upgrade: ClusterUpgrade | None = None, **kwargs) -> None:
    receive_report(node, secrets[node], report(**kwargs))


def answer(upgrade: ClusterUpgrade, run_id: int | None = 11, error: str = "") -> dict:
    return {"upgrade_id": upgrade.pk, "run_id": run_id, "error": error}


def install(state: str, run_id: int = 11, phase: int = 4) -> dict:
    return {"run_id": run_id, "state": state, "phase": phase, "percent": 40.0, "version": NEW}


def test_it_upgrades_members_one_at_a_time_as_their_reports_arrive(
    cluster, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks() as captured:
        upgrade = rolling.cluster_upgrade_start(user="admin")
    assert upgrade.order == ["central", "member1", "member2"] and upgrade.version == NEW
    assert upgrade.results["central"]["state"] == NodeStep.SKIPPED
    assert upgrade.current_node == "member1"
    assert [(t, q) for t, q, _ in sends(captured)] == [
        ("cluster.tasks.node_install_start", "lmi.node.member1")
    ]
    (request,) = sends(captured)[0][2]
    assert (request["from"], request["to"]) == ("central", "member1")
    assert request["body"] == {"upgrade_id": upgrade.pk, "version": NEW, "central_firmware": NEW}

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
    # Its record in the job engine's one table followed it node by node and ended with it.
    assert (upgrade.job.kind, upgrade.job.state) == ("cluster_upgrade", "succeeded")
    assert upgrade.job.step == upgrade.job.steps == 3 and not upgrade.job.lease_owner


def test_an_advance_that_loses_the_race_undoes_its_changes_and_returns_the_winners(
    cluster,
) -> None:
    """Seen on PostgreSQL with two nodes: the loser read the upgrade again inside its own rolled
    back transaction, and the report that carried it failed with TransactionManagementError."""
    upgrade = rolling.cluster_upgrade_start(user="admin")
    revision = ClusterUpgrade.objects.get(pk=upgrade.pk).revision
    other_advances: list[str] = []

    def another_advance_first(execute, sql, params, many, context):
        # Another advance's change lands between this one's read and its conditional update.
        if sql.startswith('UPDATE "cluster_clusterupgrade"') and not other_advances:
            other_advances.append(sql)
            execute('UPDATE "cluster_clusterupgrade" SET "revision" = "revision" + 1', (), False,
                    context)  # fmt: skip
        return execute(sql, params, many, context)

    with connection.execute_wrapper(another_advance_first):
        send_report(cluster, "member1", install=install("running"), answer=answer(upgrade))

    assert other_advances
    upgrade.refresh_from_db()  # this advance's changes are gone with its transaction
    assert upgrade.revision == revision
    assert upgrade.results["member1"]["state"] == NodeStep.REQUESTED
    # Nothing is stuck: the next report moves it on.
    send_report(cluster, "member1", install=install("running"), answer=answer(upgrade))
    upgrade.refresh_from_db()
    assert upgrade.results["member1"]["state"] == NodeStep.INSTALLING


def test_it_stops_at_the_first_failure(cluster, django_capture_on_commit_callbacks) -> None:
    upgrade = rolling.cluster_upgrade_start(user="admin")
    send_report(cluster, "member1", install=install("rolled_back"), answer=answer(upgrade))
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED and upgrade.stopped_node == "member1"
    assert "rolled_back" in upgrade.error
    assert upgrade.job.state == "failed" and "member1" in upgrade.job.error
    assert upgrade.job.step_name.startswith("member1: ")
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
    upgrade = rolling.cluster_upgrade_start(user="admin")
    send_report(cluster, "member1", answer=answer(upgrade, run_id=None, error="no firmware ready"))
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED
    assert upgrade.error == "member1: refused: no firmware ready"


def test_a_member_already_on_the_version_is_skipped(cluster) -> None:
    send_report(cluster, "member1", firmware=NEW)
    upgrade = rolling.cluster_upgrade_start(user="admin")
    assert upgrade.results["member1"]["state"] == NodeStep.SKIPPED
    assert upgrade.current_node == "member2"


def test_a_silent_member_times_out_on_beat(cluster, settings) -> None:
    settings.CLUSTER_NODE_UPGRADE_TIMEOUT = 60
    upgrade = rolling.cluster_upgrade_start(user="admin")
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
    with pytest.raises(plumbing.ClusterError, match="member2 is unreachable"):
        rolling.cluster_upgrade_start(user="admin")
    assert not ClusterUpgrade.objects.exists()


def test_it_refuses_a_second_upgrade_and_an_empty_one(cluster) -> None:
    rolling.cluster_upgrade_start(user="admin")
    with pytest.raises(plumbing.ClusterError, match="already running"):
        rolling.cluster_upgrade_start(user="admin")
    ClusterUpgrade.objects.update(state=UpgradeState.STOPPED)
    ClusterMember.objects.update(firmware_version=NEW)
    with pytest.raises(plumbing.ClusterError, match="nothing to upgrade"):
        rolling.cluster_upgrade_start(user="admin")


def test_only_central_upgrades_the_cluster(member_role) -> None:
    with pytest.raises(plumbing.ClusterError, match="Cluster Central"):
        rolling.cluster_upgrade_start(user="admin")


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
    rolling.cluster_upgrade_advance()
    upgrade.refresh_from_db()
    assert upgrade.current_node == "central" and upgrade.results["central"]["phase"] == 5
    type(run).objects.filter(pk=run.pk).update(state="succeeded")
    set_firmware(NEW)
    with django_capture_on_commit_callbacks() as captured:
        rolling.cluster_upgrade_advance()
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
    rolling.cluster_upgrade_advance()
    upgrade.refresh_from_db()
    assert upgrade.state == UpgradeState.STOPPED and upgrade.stopped_node == "central"
    assert "SMTP down" in upgrade.error
    assert upgrade.results["member1"]["state"] == NodeStep.PENDING


def install_request(upgrade_id: int = 9, *, secret: str = "s", **kwargs) -> dict:
    body = {"upgrade_id": upgrade_id, "version": NEW, "central_firmware": NEW}
    return from_central(secret, "node_install_start", body, **kwargs)


def test_member_answers_an_install_request_once_and_says_why_not(
    member_role, django_capture_on_commit_callbacks
) -> None:
    member_joins("t" * 32, secret="s")
    for _ in range(2):  # asked twice (Central asks again when no answer came)
        rolling.member_install_start(message=install_request(9))
    link = CentralLink.objects.get()
    assert link.upgrade_id == 9 and link.upgrade_run_id is None
    assert "no firmware download is ready on member1" in link.upgrade_error
    assert link.central_firmware == NEW
    assert Event.objects.filter(message__contains="asked for firmware").count() == 1
    report_data, _events = member_services.member_report_build()
    assert report_data["cluster_upgrade"]["upgrade_id"] == 9


def test_member_ignores_install_requests_from_another_central(member_role) -> None:
    member_joins("t" * 32, secret="s")
    assert rolling.member_install_start(message=install_request(1, central="rogue")) is None
    assert CentralLink.objects.get().upgrade_id is None


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda: [1, NEW, "central", NEW], id="old-unsigned-arguments"),
        pytest.param(lambda: {**install_request(1), "mac": "0" * 64}, id="wrong-mac"),
        pytest.param(lambda: install_request(1, secret="guessed"), id="wrong-key"),
        pytest.param(
            lambda: {k: v for k, v in install_request(1).items() if k != "mac"}, id="no-mac"
        ),
        pytest.param(
            lambda: {**install_request(1), "body": {**install_request(1)["body"], "upgrade_id": 2}},
            id="altered-body",
        ),
    ],
)
def test_a_forged_install_request_is_refused_and_starts_nothing(
    member_role, monkeypatch, forge
) -> None:
    member_joins("t" * 32, secret="s")
    started: list[str] = []
    monkeypatch.setattr(rolling, "_start_local_install",
                        lambda version, user: started.append(version) or (1, ""))  # fmt: skip
    assert rolling.member_install_start(message=forge()) is None
    assert started == [] and CentralLink.objects.get().upgrade_id is None
    event = Event.objects.get(message__startswith="Refused an install request")
    assert event.severity == Severity.WARNING
    assert signing.member_key("s") not in event.message + json.dumps(event.details)
    # The genuine request, signed by Central, still starts the install.
    assert rolling.member_install_start(message=install_request(1))
    assert started == [NEW]


def test_a_replayed_or_stale_install_request_is_refused(member_role, monkeypatch, clock) -> None:
    member_joins("t" * 32, secret="s")
    started: list[int] = []
    monkeypatch.setattr(rolling, "_start_local_install",
                        lambda version, user: started.append(1) or (len(started), ""))  # fmt: skip
    genuine = install_request(1)
    assert rolling.member_install_start(message=genuine)
    CentralLink.objects.update(upgrade_id=None)  # even once this member has moved on
    assert rolling.member_install_start(message=genuine) is None
    stale = install_request(2, now=clock.now() - timedelta(minutes=6))
    assert rolling.member_install_start(message=stale) is None
    assert started == [1]
    assert Event.objects.filter(message__contains="it was received before").count() == 1
    assert Event.objects.filter(message__contains="sent more than 300 s ago").count() == 1


def test_the_install_task_refuses_what_is_not_one_sealed_message(member_role, monkeypatch) -> None:
    member_joins("t" * 32, secret="s")
    started: list[str] = []
    monkeypatch.setattr(rolling, "_start_local_install",
                        lambda version, user: started.append(version) or (1, ""))  # fmt: skip
    tasks.node_install_start.apply(args=(1, NEW, "central", NEW)).get()
    tasks.node_install_start.apply(args=(install_request(1), "extra")).get()
    assert started == []
    assert Event.objects.filter(message__startswith="Refused an install request").count() == 1
    tasks.node_install_start.apply(args=(install_request(1),)).get()
    assert started == [NEW]


def test_central_asks_again_when_the_install_request_is_not_answered_in_time(
    cluster, clock, django_capture_on_commit_callbacks
) -> None:
    upgrade = rolling.cluster_upgrade_start(user="admin")
    with django_capture_on_commit_callbacks() as captured:
        services.central_tick()
    assert sends(captured) == []  # not yet: the request may still be in the queue
    clock.shift(timedelta(minutes=6))
    with django_capture_on_commit_callbacks() as captured:
        services.central_tick()
    assert [(t, q) for t, q, _ in sends(captured)] == [
        ("cluster.tasks.node_install_start", "lmi.node.member1")
    ]
    upgrade.refresh_from_db()
    assert upgrade.results["member1"]["state"] == NodeStep.REQUESTED
    assert upgrade.results["member1"]["requests"] == 2
    # Once the member has answered, it is not asked again.
    send_report(cluster, "member1", install=install("running"), answer=answer(upgrade))
    clock.shift(timedelta(minutes=6))
    with django_capture_on_commit_callbacks() as captured:
        services.central_tick()
    assert not [s for s in sends(captured) if s[0] == "cluster.tasks.node_install_start"]
