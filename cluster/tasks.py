"""Celery interface of the cluster: every message between nodes is one of these tasks.

Which node runs a task is decided by the queue it is sent to (``lmi.node.<name>``), never by
the task: members send member_join and member_report to Central's queue; Central sends
join_answer, member_removed, central_update and node_install_start to a member's queue.
Arguments are JSON. Each task calls one service and returns.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready

from cluster import services

logger = logging.getLogger(__name__)


@shared_task(name="cluster.tasks.member_join", bind=True, ignore_result=True)
def member_join(self: Task, node: str, token: str, info: dict[str, Any]) -> bool:
    """On Central: a member asks to join with a token (the sender's origin goes in the event
    of a refusal)."""
    origin = str(getattr(self.request, "origin", None) or "")
    return services.join_request_receive(node=node, token=token, info=info, origin=origin)


@shared_task(name="cluster.tasks.join_answer", ignore_result=True)
def join_answer(central: str, accepted: bool, message: str, secret: str, firmware: str) -> None:
    """On a member: Central's answer to its join request."""
    services.join_answer_receive(
        central=central, accepted=accepted, message=message, secret=secret, firmware=firmware
    )


@shared_task(name="cluster.tasks.member_removed", ignore_result=True)
def member_removed(central: str) -> None:
    """On a member: Central removed it from the cluster."""
    services.member_removed_receive(central=central)


@shared_task(name="cluster.tasks.member_report", ignore_result=True)
def member_report(
    node: str, secret: str, report: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    """On Central: a member's report and its new events."""
    services.member_report_receive(node=node, secret=secret, report=report, events=events)


@shared_task(name="cluster.tasks.central_update", ignore_result=True)
def central_update(central: str, firmware: str, events_cursor: int) -> None:
    """On a member: Central's firmware level and the events it has stored."""
    services.central_update_receive(central=central, firmware=firmware, events_cursor=events_cursor)


@shared_task(name="cluster.tasks.node_install_start", ignore_result=True)
def node_install_start(upgrade_id: int, version: str, central: str, central_firmware: str) -> None:
    """On a member: Central's rolling upgrade asks this member to install ``version``."""
    services.member_install_start(
        upgrade_id=upgrade_id, version=version, central=central, central_firmware=central_firmware
    )


@shared_task(name="cluster.tasks.member_tick", ignore_result=True)
def member_tick() -> bool:
    """Beat on a member (every CLUSTER_REPORT_SECONDS): report to Central."""
    return services.member_report_send()


@shared_task(name="cluster.tasks.central_tick", ignore_result=True)
def central_tick() -> None:
    """Beat on Central: mark silent members unreachable, advance a rolling upgrade."""
    services.central_tick()


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """A member started with LMI_CLUSTER_JOIN_TOKEN joins; a joined member reports at once."""
    try:
        if not services.member_autojoin():
            services.member_report_send()
    except Exception:  # never keep a worker from starting
        logger.exception("could not join or report to Cluster Central at start-up")
