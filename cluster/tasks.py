"""Celery interface of the cluster: every message between nodes is one of these tasks.

Which node runs a task is decided by the queue it is sent to (``lmi.node.<name>``), never by
the task: members send member_join and member_report to Central's queue; Central sends
join_answer, member_removed, central_update and node_install_start to a member's queue.

Each of those takes one argument, a sealed message (``cluster.signing``), and calls one service,
which opens it before anything else: whoever can write to the broker can put a task on any
queue, so a message is worth only its signature. Anything else the broker delivers (the
arguments of an older version, a forged message) reaches the service too, and is refused there
with its event, instead of failing in Celery's call.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready

from cluster import member_services, rolling, services

logger = logging.getLogger(__name__)


def _one(args: tuple[Any, ...]) -> Any:
    """The sealed message among a task's positional arguments (a lone one), else all of
    them, which the service refuses as not a signed message."""
    return args[0] if len(args) == 1 else list(args)


@shared_task(name="cluster.tasks.member_join", bind=True, ignore_result=True)
def member_join(self: Task, *message: Any) -> bool:
    """On Central: a member asks to join with a token (the sender's origin goes in the event
    of a refusal)."""
    origin = str(getattr(self.request, "origin", None) or "")
    return services.join_request_receive(message=_one(message), origin=origin)


@shared_task(name="cluster.tasks.join_answer", ignore_result=True)
def join_answer(*message: Any) -> None:
    """On a member: Central's answer to its join request."""
    member_services.join_answer_receive(message=_one(message))


@shared_task(name="cluster.tasks.member_removed", ignore_result=True)
def member_removed(*message: Any) -> None:
    """On a member: Central removed it from the cluster."""
    member_services.member_removed_receive(message=_one(message))


@shared_task(name="cluster.tasks.member_report", ignore_result=True)
def member_report(*message: Any) -> None:
    """On Central: a member's report and its new events."""
    services.member_report_receive(message=_one(message))


@shared_task(name="cluster.tasks.central_update", ignore_result=True)
def central_update(*message: Any) -> None:
    """On a member: Central's firmware level and the events it has stored."""
    member_services.central_update_receive(message=_one(message))


@shared_task(name="cluster.tasks.node_install_start", ignore_result=True)
def node_install_start(*message: Any) -> None:
    """On a member: Central's rolling upgrade asks this member to install a version."""
    rolling.member_install_start(message=_one(message))


@shared_task(name="cluster.tasks.member_tick", ignore_result=True)
def member_tick() -> bool:
    """Beat on a member (every CLUSTER_REPORT_SECONDS): report to Central."""
    return member_services.member_report_send()


@shared_task(name="cluster.tasks.central_tick", ignore_result=True)
def central_tick() -> None:
    """Beat on Central: mark silent members unreachable, advance a rolling upgrade."""
    services.central_tick()


@worker_ready.connect
def on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """A member started with LMI_CLUSTER_JOIN_TOKEN joins; a joined member reports at once."""
    try:
        if not member_services.member_autojoin():
            member_services.member_report_send()
    except Exception:  # never keep a worker from starting
        logger.exception("could not join or report to Cluster Central at start-up")
