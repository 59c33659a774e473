"""What every cluster message goes through, and what this node knows about itself.

Nodes share nothing but the Redis broker: everything one node tells another is a Celery message
sent with :func:`send` after the sender's transaction commits, one JSON envelope signed with a
key only the two nodes hold (``cluster.signing``), and opened with :func:`open_sealed` before
anything else by the receiving service, which refuses (one WARNING event) a message that is
forged, altered, replayed, stale or not for this node. cluster.services (Central's joins and
reports), cluster.member_services (a member's) and cluster.rolling (the rolling upgrade) build
on this module.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.utils import timezone

from appliance.system.errors import ApplianceError
from cluster import signing
from cluster.models import (
    CentralLink,
    ClusterMember,
)
from events.models import Category, Event, Severity
from events.services import event_write
from lmi.celery import node_queue

logger = logging.getLogger(__name__)

User = AbstractBaseUser | AnonymousUser | str | None

STANDALONE, CENTRAL, MEMBER = "standalone", "central", "member"
TOKEN_LIFETIME = timedelta(hours=24)
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
TOKEN_HASH_RE = re.compile(r"[0-9a-f]{64}")
VERSION_RE = re.compile(r"\d{1,4}(\.\d{1,4}){0,7}")
STAGE_RE = re.compile(r"[a-z_]{1,20}")  # an upgrades.story.Stage value
INSTALL_ACTIVE = ("queued", "running", "rolling_back")
INSTALL_FAILED = ("failed", "rolled_back", "aborted")
# A report never carries more than this many events, whatever the sender claims.
MAX_EVENTS_PER_REPORT = 1000


class ClusterError(Exception):
    """A cluster action that cannot be done; the message is for the user."""


class NotAMember(ClusterError):
    """The node named is not (or no longer) a member of this cluster."""


class JoinRefused(ClusterError):
    """A join request Central refuses (bad, expired or used token; bad or taken node name)."""


# --- plumbing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One message to another node's queue, sent when the current transaction commits.

    A callable object rather than a lambda so a test capturing on-commit callbacks can see
    what would be sent where without a broker.
    """

    task: str
    args: tuple[Any, ...]
    queue: str

    def __call__(self) -> None:
        from lmi.celery import app

        app.send_task(self.task, args=list(self.args), queue=self.queue, argsrepr=self.argsrepr())

    def argsrepr(self) -> str:
        """The arguments as Celery shows them (worker logs, task events, monitors).

        A sealed message carries no secret in clear, but whoever reads those logs is not a
        member: the join token's hash, the encrypted member secret and the signature are
        masked all the same (a logged message is then no copy that could be sent again).
        """
        return repr([_masked(arg) for arg in self.args])


# Body fields of a sealed message never shown in Celery's logs (see Outgoing.argsrepr).
MASKED_FIELDS = frozenset({"token", "secret"})


def _masked(arg: Any) -> Any:
    if not isinstance(arg, dict) or not isinstance(arg.get("body"), dict):
        return arg
    body = {k: "***" if k in MASKED_FIELDS else v for k, v in arg["body"].items()}
    return {**arg, "body": body, "mac": "***"}


def send(kind: str, node: str, key: str, body: dict[str, Any]) -> None:
    """Send ``body`` to ``node`` as a ``kind`` message (the task cluster.tasks.<kind>), sealed
    with ``key``, once the current transaction commits."""
    message = signing.seal(key, kind=kind, sender=settings.NODE_NAME, recipient=node, body=body)
    transaction.on_commit(Outgoing(f"cluster.tasks.{kind}", (message,), node_queue(node)))


# What the event of a refused message calls each kind.
MESSAGE_NAMES = {
    "member_join": "a join request",
    "join_answer": "a join answer",
    "member_report": "a report",
    "central_update": "an update (Cluster Central's answer to a report)",
    "node_install_start": "an install request",
    "member_removed": "a removal notice",
    "bundle_fetch": "a firmware bundle request",
}


def open_sealed(
    message: Any, *, kind: str, key: signing.KeyFor, origin: str = ""
) -> signing.Opened | None:
    """Open a received ``kind`` message addressed to this node (``signing.open_sealed``, with
    ``key`` finding the claimed sender's key); None when it is refused, after its event."""
    try:
        return signing.open_sealed(message, kind=kind, recipient=settings.NODE_NAME, key=key)
    except signing.Refused as exc:
        refusal_event(kind, message, str(exc), origin=origin)
        return None


def refusal_event(kind: str, message: Any, reason: str, *, origin: str = "") -> None:
    """The WARNING event of a refused message: what it claimed to be, from whom, and why.

    Never the body or the signature. Written at most once per identical text within
    ``signing.MAX_AGE`` (a read first: a rare duplicate in a race is harmless), so a node with
    a wrong clock, or a removed member that missed its notice and still reports, does not
    write an event every report interval; the process log has every refusal.
    """
    claimed = message.get("from") if isinstance(message, dict) else None
    sender = repr(claimed[:64]) if isinstance(claimed, str) and claimed else "an unnamed sender"
    text = f"Refused {MESSAGE_NAMES.get(kind, repr(kind))} from {sender}: {reason}"
    if origin:
        text += f" (sent by {origin[:100]})"
    text = text[:500]
    logger.warning("%s", text)
    recent = timezone.now() - signing.MAX_AGE
    if Event.objects.filter(
        category=Category.CLUSTER, message=text, created_at__gte=recent
    ).exists():
        return
    event_write(
        category=Category.CLUSTER,
        severity=Severity.WARNING,
        message=text,
        details={
            "kind": kind,
            "sender": claimed[:64] if isinstance(claimed, str) else "",
            "reason": reason,
            "origin": origin[:100],
        },
    )


def member_key(sender: str, _body: dict[str, Any]) -> str:
    """Central: the key of messages from the member ``sender``."""
    member = ClusterMember.objects.filter(node=sender).first()
    if member is None:
        raise signing.Refused("it is not a member of this cluster")
    return member.secret_hash


def central_key(link: CentralLink, sender: str) -> str:
    """A member: the key of messages from our Cluster Central ``sender``."""
    if not link.secret:
        raise signing.Refused("this node is not a member of a cluster")
    if sender != link.central:
        raise signing.Refused(f"this node's Cluster Central is {link.central}")
    return signing.member_key(link.secret)


def open_from_central(
    link: CentralLink,
    message: Any,
    *,
    kind: str,
    key: Callable[[CentralLink, str], str] = central_key,
) -> signing.Opened | None:
    """A member: open a received ``kind`` message with the key ``key`` finds in our ``link``
    for its sender (``open_sealed``: None when it is refused, after its event)."""
    return open_sealed(message, kind=kind, key=lambda sender, _body: key(link, sender))


def cluster_role() -> str:
    return settings.CLUSTER_ROLE


def require(role: str, action: str) -> None:
    if cluster_role() != role:
        names = {CENTRAL: "Cluster Central", MEMBER: "a cluster member"}
        raise ClusterError(
            f"{action} is done on {names[role]}; this node ({settings.NODE_NAME}) is "
            f"{cluster_role()} (LMI_CLUSTER_ROLE)."
        )


def version_or_blank(value: Any) -> str:
    text = str(value or "")[:32]
    return text if VERSION_RE.fullmatch(text) else ""


# --- what this node knows about itself ----------------------------------------------------


def local_firmware() -> str:
    """The firmware level this node runs ("" when the appliance cannot say)."""
    from appliance.system.facts import system_info

    try:
        return system_info().firmware_version
    except ApplianceError:
        return ""


def local_health() -> dict[str, bool]:
    """Services up on this node: the appliance readable, mail accepted (not in maintenance),
    the mail processing service listening. ``healthy`` is all of them."""
    from appliance.system.maintenance import maintenance_status

    health = {"appliance": bool(local_firmware())}
    try:
        health["accepting_mail"] = maintenance_status() is None
    except ApplianceError:
        health["accepting_mail"] = False
    try:
        with socket.create_connection((settings.SMTP_HOST, settings.SMTP_PORT), timeout=1.0):
            health["smtp"] = True
    except OSError:
        health["smtp"] = False
    health["healthy"] = all(health.values())
    return health


def local_install() -> dict[str, Any]:
    """The latest firmware install run on this node, in the shape reports carry, with the
    node's update story (upgrades.story), so Central tells each member's update as the member's
    own pages do."""
    try:
        from upgrades.models import InstallRun
        from upgrades.story import update_story
    except ImportError:  # the install engine is not there yet
        return {}
    story = update_story()
    told = {"stage": str(story.stage), "story": story.headline}
    run = InstallRun.objects.order_by("-id").first()
    if run is None:
        return told
    phase = run.phases.filter(number=run.phase).first() if run.phase else None
    within = (phase.percent if phase is not None else 0.0) / 100.0
    done_phases = max(0, run.phase - 1) + within
    percent = 100.0 if run.state == "succeeded" else round(100.0 * done_phases / 10, 1)
    return {
        "run_id": run.pk,
        "state": run.state,
        "phase": run.phase,
        "percent": percent,
        "version": run.version,
        "trigger": run.trigger,
        "error": run.error[:500],
        **told,
    }


def central_link() -> CentralLink:
    link, _ = CentralLink.objects.get_or_create(pk=1)
    return link


def report_soon() -> None:
    """Member: send Central a report now (after an answer or an install start), not at the next
    beat."""
    from lmi.celery import app

    app.send_task("cluster.tasks.member_tick", queue=node_queue(settings.NODE_NAME))
