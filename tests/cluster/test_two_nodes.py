"""Two real nodes on this machine sharing one Redis: Central (this test's database and root,
its own worker) and a member (its own root, database, var/ and worker). They talk only through
their queues, as in production, every message sealed (cluster.signing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import services
from cluster.models import ClusterMember
from events.models import Event
from tests.cluster.nodes import Node, migrated_database, new_member
from tests.support.services import test_database_url as central_database_url
from tests.support.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="session")
def member_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_database(tmp_path_factory.mktemp("member-db"))


@pytest.fixture
def central_node(
    redis_settings: str, transactional_db: None, demo_appliance: Path, tmp_path: Path, settings
) -> Iterator[Node]:
    """This process is Cluster Central; its worker consumes Central's queue (and the default
    queue the test process sends to, so an install started here runs there)."""
    settings.CLUSTER_ROLE = "central"
    settings.NODE_NAME = "central"
    node = Node(
        name="central", role="central", root=demo_appliance, var_dir=tmp_path / "central-var",
        database_url=central_database_url(), redis_url=redis_settings,
        queues=("lmi.node.central", settings.CELERY_TASK_DEFAULT_QUEUE),
    )  # fmt: skip
    yield node
    node.stop()


def test_member_joins_reports_and_its_events_reach_central(
    central_node: Node, member_database: Path, tmp_path: Path, redis_settings: str
) -> None:
    _row, token = services.join_token_create(user="admin")
    central_node.start_worker()
    member = new_member(
        "member1", tmp_path, member_database, redis_settings, LMI_CLUSTER_JOIN_TOKEN=token
    )
    try:
        member.start_worker()  # joins with the token at start, then reports every second
        joined = wait_for(
            lambda: ClusterMember.objects.filter(node="member1", reports__gte=2).first(),
            timeout=40, message="member1 did not join and report",
        )  # fmt: skip
        assert joined.firmware_version == "2.8.0.0" and joined.reachable
        assert "smtp" in joined.health
        # The member's own events (its join, written on the member) are in Central's log.
        wait_for(
            lambda: Event.objects.filter(
                node="member1", message="Joined the cluster of Cluster Central central"
            ).exists(),
            timeout=20, message="member1's events did not reach Central",
        )  # fmt: skip
        # A second join with the spent token is refused, with an event on Central.
        member.manage("cluster_join", token)
        wait_for(
            lambda: Event.objects.filter(message__startswith="Refused a join request").exists(),
            timeout=20,
        )

        # The member stays joined (a refused re-join keeps the membership) and knows the
        # firmware level Central pushed with its answers.
        def link() -> list[str]:
            out = member.manage("shell", "-v", "0", "-c", "from cluster.models import CentralLink "
                                "as L; l = L.objects.get(); print(l.state, l.central_firmware, "
                                "bool(l.error))")  # fmt: skip
            return out.strip().splitlines()[-1].split()

        assert wait_for(lambda: link() == ["joined", "2.8.0.0", "True"], timeout=20, interval=1)
        # Every message went sealed and was accepted on both sides (the member's events,
        # refusals included, are in Central's log): the only refusal is that join's.
        refused = Event.objects.filter(message__startswith="Refused")
        assert [e.message for e in refused.exclude(message__contains="already used")] == []
        # Silent for three reports: unreachable (Central's beat notices).
        member.worker.kill()
        wait_for(
            lambda: not ClusterMember.objects.get(node="member1").reachable,
            timeout=20, message="member1 was not marked unreachable",
        )  # fmt: skip
        assert Event.objects.filter(message__startswith="member1 is unreachable").exists()
    finally:
        member.stop()
