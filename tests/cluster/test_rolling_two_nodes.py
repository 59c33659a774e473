"""A full rolling upgrade over two real nodes (Central, then the member), each running the real
install engine on its own appliance, database and worker; and a member whose worker is
SIGKILLed in the middle of its install."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.firmware import license as appliance_license
from appliance.system.facts import system_info
from cluster import rolling, services
from cluster.models import ClusterMember, ClusterUpgrade, NodeStep, UpgradeState
from events.models import Event
from tests.cluster.nodes import Node, new_member
from tests.cluster.test_two_nodes import central_node, member_database  # noqa: F401
from tests.support.feed_server import feed_server  # noqa: F401
from tests.support.services import wait_for
from tests.upgrades.conftest import firmware, issue_license, licensed, run_download, vendor  # noqa: F401
from tests.upgrades.test_install import roomy_disk
from upgrades import install

pytest.importorskip("upgrades.install")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEW = "2.8.1.0"
MEMBER_DOWNLOAD = (
    "from upgrades import downloader, services as s; s.update_check(trigger='user', user='admin'); "
    "d = s.download_start(user='admin', trigger='user', enqueue=False); "
    "downloader.download_execute(d.pk); d.refresh_from_db(); print('DOWNLOAD', d.state)"
)


@pytest.fixture
def two_nodes(
    central_node: Node,  # noqa: F811
    member_database: Path,  # noqa: F811
    firmware,  # noqa: F811
    vendor,  # noqa: F811
    tmp_path: Path,
    redis_settings: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Node, Node]]:
    """Central and member1, both licensed, both with firmware 2.8.1.0 downloaded and verified,
    both serving mail, joined and reporting."""
    firmware.offer(firmware.build())
    assert run_download().state == "ready"
    # Central's preflight runs in this process: the 50% free-disk rule is not this shared
    # machine's to meet (as in tests/upgrades/test_install.py). The member's runs in its own
    # worker, so its root and database live on a tmpfs that really has the room.
    monkeypatch.setattr(install, "PREFLIGHT_DISK_USAGE", roomy_disk)
    member_env = getattr(request, "param", {})
    base = Path(tempfile.mkdtemp(prefix="lmi-member-", dir="/dev/shm"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    member = new_member("member1", base, member_database, redis_settings, **member_env)
    appliance_license.install_license(issue_license(vendor), root=member.root)
    assert "DOWNLOAD ready" in member.manage("shell", "-v", "0", "-c", MEMBER_DOWNLOAD)
    _row, token = services.join_token_create(user="admin")
    member.extra_env["LMI_CLUSTER_JOIN_TOKEN"] = token
    try:
        central_node.start_smtp()
        member.start_smtp()
        central_node.start_worker()
        member.start_worker()
        wait_for(
            lambda: ClusterMember.objects.filter(node="member1", reports__gte=1, healthy=True),
            timeout=40, message="member1 did not join healthy",
        )  # fmt: skip
        yield central_node, member
    finally:
        member.stop()


def finished(upgrade: ClusterUpgrade) -> ClusterUpgrade | None:
    upgrade.refresh_from_db()
    return upgrade if upgrade.state != UpgradeState.RUNNING else None


def test_rolling_upgrade_central_first_then_the_member(two_nodes) -> None:
    central, member = two_nodes
    upgrade = rolling.cluster_upgrade_start(user="admin")
    assert upgrade.order == ["central", "member1"] and upgrade.version == NEW
    # The member is not asked before Central runs the new version healthily.
    wait_for(lambda: finished(upgrade) or upgrade.current_node == "member1", timeout=90,
             interval=0.5, message="Central's own install did not finish")  # fmt: skip
    assert upgrade.results["central"]["state"] == NodeStep.DONE, upgrade.error
    assert system_info(central.root).firmware_version == NEW
    wait_for(lambda: finished(upgrade), timeout=120, interval=0.5,
             message="the member's install did not finish")  # fmt: skip
    assert upgrade.state == UpgradeState.SUCCEEDED, upgrade.error
    assert upgrade.results["member1"]["state"] == NodeStep.DONE
    assert system_info(member.root).firmware_version == NEW
    assert ClusterMember.objects.get(node="member1").firmware_version == NEW
    # The member's own install events are in Central's event log.
    wait_for(lambda: Event.objects.filter(node="member1", category="update").exists(), timeout=20)


@pytest.mark.parametrize(
    "two_nodes", [{"LMI_INSTALL_PHASE_DELAY_MS": "400", "LMI_INSTALL_LEASE_SECONDS": "3"}],
    indirect=True,
)  # fmt: skip
def test_member_killed_mid_upgrade_completes_or_stops_clearly(two_nodes) -> None:
    _central, member = two_nodes
    upgrade = rolling.cluster_upgrade_start(user="admin")
    wait_for(
        lambda: ClusterMember.objects.get(node="member1").install.get("phase", 0) >= 3
        and ClusterMember.objects.get(node="member1").install_running,
        timeout=150, interval=0.3, message="the member's install did not reach phase 3",
    )  # fmt: skip
    member.worker.kill()
    time.sleep(1)
    member.start_worker()
    wait_for(lambda: finished(upgrade), timeout=150, interval=0.5,
             message="the rolling upgrade neither completed nor stopped")  # fmt: skip
    assert upgrade.state in (UpgradeState.SUCCEEDED, UpgradeState.STOPPED)
    if upgrade.state == UpgradeState.SUCCEEDED:
        assert system_info(member.root).firmware_version == NEW
    else:
        assert upgrade.stopped_node == "member1" and upgrade.error
        assert system_info(member.root).firmware_version in ("2.8.0.0", NEW)
