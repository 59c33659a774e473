"""Cluster services of a member: joining Central, reporting to it, and what Central tells it.

The Central side (join tokens, joins, reports received, removing a member) is
:mod:`cluster.services`; the messages between the two go through :mod:`cluster.plumbing`, and
every receiver here is idempotent as there (a message can arrive twice or late).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, When
from django.utils import timezone

from cluster import signing
from cluster.models import (
    CentralLink,
    JoinState,
)
from cluster.plumbing import (
    MEMBER,
    TOKEN_RE,
    ClusterError,
    User,
    central_link,
    cluster_role,
    local_firmware,
    local_health,
    local_install,
    open_from_central,
    refusal_event,
    report_soon,
    require,
    send,
    version_or_blank,
)
from events.models import Category, Event, Severity
from events.services import event_write

logger = logging.getLogger(__name__)


def cluster_join_request(*, token: str, user: User = None) -> CentralLink:
    """Member: ask Central (settings.CLUSTER_CENTRAL) to accept this node with a join token.

    The token itself is not sent, nor kept: the request names it by its SHA-256 and is signed
    with the join's key (both derived from it, ``cluster.signing``); the key waits in the link
    for Central's answer, which is signed with it and carries our secret encrypted under it.
    """
    require(MEMBER, "Joining a cluster")
    token = (token or "").strip()
    if not TOKEN_RE.fullmatch(token):
        raise ClusterError(
            "That is not a join token (create one on Cluster Central's Cluster page)."
        )
    central = settings.CLUSTER_CENTRAL
    key = signing.join_key(token)
    with transaction.atomic():
        link = central_link()
        link.central = central
        link.state = JoinState.PENDING
        link.join_key = key
        link.error = ""
        link.requested_at = timezone.now()
        link.save()
        info = {"hostname": socket.gethostname(), "firmware": local_firmware()}
        send("member_join", central, key, {"token": signing.token_hash(token), "info": info})
        event_write(
            category=Category.CLUSTER,
            message=f"Asked Cluster Central {central} to join the cluster",
            user=user,
            details={"central": central},
        )
    return link


def _pending_join_key(link: CentralLink, sender: str) -> str:
    """A member: the key of the answer to our pending join request, from ``sender``."""
    if link.state != JoinState.PENDING or not link.join_key:
        raise signing.Refused("no join request of this node is waiting for an answer")
    if sender != link.central:
        raise signing.Refused(f"this node asked {link.central} to join, not it")
    return link.join_key


def join_answer_receive(*, message: Any) -> CentralLink | None:
    """Member: Central's answer to our join request, signed with the join's key (refused
    unless one is pending and it is from the Central we asked). An accepted answer carries
    our secret encrypted under that key; the join key is forgotten either way."""
    if cluster_role() != MEMBER:
        return None
    now = timezone.now()
    with transaction.atomic():
        link = central_link()
        opened = open_from_central(link, message, kind="join_answer", key=_pending_join_key)
        if opened is None:
            return None
        central = opened.sender
        accepted = opened.body.get("accepted") is True
        text = str(opened.body.get("message") or "")
        if accepted:
            try:
                secret = signing.secret_decrypt(link.join_key, opened.body.get("secret"))
            except signing.Refused as exc:
                refusal_event("join_answer", message, str(exc))
                return None
            changed = CentralLink.objects.filter(pk=1, state=JoinState.PENDING).update(
                state=JoinState.JOINED,
                central=central[:64],
                secret=secret[:100],
                join_key="",
                error="",
                joined_at=now,
                central_firmware=version_or_blank(opened.body.get("firmware")),
                central_seen_at=now,
                # Re-joining the same Central (after an administrator removed us) keeps the
                # events it already stored: they stay in its log, sending them again would
                # double them.
                events_acked=Case(When(central=central[:64], then=F("events_acked")), default=0),
            )
        else:
            # A refused re-join leaves a working membership (and its secret) as it was.
            changed = CentralLink.objects.filter(pk=1, state=JoinState.PENDING).update(
                state=JoinState.JOINED if link.secret else JoinState.REFUSED,
                join_key="",
                error=text[:500],
            )
        if not changed:
            logger.warning("ignoring a join answer from %r: no join request is pending", central)
            return None
        event_write(
            category=Category.CLUSTER,
            severity=Severity.INFO if accepted else Severity.WARNING,
            message=f"Joined the cluster of Cluster Central {central}"
            if accepted
            else f"Cluster Central {central} refused to let this node join: {text}",
            details={"central": central[:64]},
        )
        if accepted:
            transaction.on_commit(report_soon)
    return central_link()


def central_update_receive(*, message: Any) -> None:
    """Member: Central's answer to a report (its firmware level, the events it has stored),
    signed with our key."""
    if cluster_role() != MEMBER:
        return
    with transaction.atomic():
        link = central_link()
        opened = open_from_central(link, message, kind="central_update")
        if opened is None or link.state != JoinState.JOINED:
            return
        fields: dict[str, Any] = {"central_seen_at": timezone.now()}
        level = version_or_blank(opened.body.get("firmware"))
        if level:
            fields["central_firmware"] = level
        events_cursor = opened.body.get("events_cursor")
        if isinstance(events_cursor, int):
            fields["events_acked"] = max(link.events_acked, events_cursor)
        CentralLink.objects.filter(pk=1).update(**fields)


def member_report_build() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Member: the report (firmware, health, install, our rolling-upgrade answer) and the next
    batch of events Central has not confirmed."""
    link = central_link()
    report: dict[str, Any] = {
        "firmware": local_firmware(),
        "hostname": socket.gethostname(),
        "health": local_health(),
        "install": local_install(),
        "sent_at": timezone.now().isoformat(),
    }
    if link.upgrade_id is not None:
        report["cluster_upgrade"] = {
            "upgrade_id": link.upgrade_id,
            "run_id": link.upgrade_run_id,
            "error": link.upgrade_error,
        }
    events = [
        {
            "id": e.pk,
            "created_at": e.created_at.isoformat(),
            "severity": e.severity,
            "category": e.category,
            "username": e.username,
            "message": e.message,
            "details": e.details,
        }
        for e in Event.objects.filter(pk__gt=link.events_acked).order_by("pk")[
            : settings.CLUSTER_EVENT_BATCH
        ]
    ]
    return report, events


def member_report_send() -> bool:
    """Member, beat: send the report and new events to Central (when joined)."""
    if cluster_role() != MEMBER:
        return False
    link = central_link()
    if link.state != JoinState.JOINED:
        return False
    report, events = member_report_build()
    with transaction.atomic():
        CentralLink.objects.filter(pk=1).update(last_report_at=timezone.now())
        send(
            "member_report",
            link.central,
            signing.member_key(link.secret),
            {"report": report, "events": events},
        )
    return True


def member_autojoin() -> bool:
    """Member, at worker start: join with LMI_CLUSTER_JOIN_TOKEN if never joined yet."""
    if cluster_role() != MEMBER or not settings.CLUSTER_JOIN_TOKEN:
        return False
    if central_link().state != JoinState.NOT_JOINED:
        return False
    cluster_join_request(token=settings.CLUSTER_JOIN_TOKEN, user="cluster")
    return True


def member_removed_receive(*, message: Any) -> CentralLink | None:
    """Member, the member_removed task: our Central forgot us. Drop the secret (it is worth
    nothing now) and go back to not joined, so the Cluster page offers the join form again.
    ``events_acked`` stays: Central keeps the events it stored, a re-join sends only newer ones.

    The notice must be signed with our key by our Central: nobody else can cut a member off.
    """
    if cluster_role() != MEMBER:
        return None
    with transaction.atomic():
        opened = open_from_central(central_link(), message, kind="member_removed")
        if opened is None:
            return None
        central = opened.sender
        changed = CentralLink.objects.filter(pk=1, state=JoinState.JOINED, central=central).update(
            state=JoinState.NOT_JOINED,
            secret="",
            error=f"Cluster Central {central} removed this node from the cluster: join again "
            "with a new token to rejoin.",
            central_firmware="",
        )
        if not changed:
            logger.warning("ignoring a removal notice from %r: not joined to it", central)
            return None
        event_write(
            category=Category.CLUSTER,
            severity=Severity.WARNING,
            message=f"Cluster Central {central} removed this node from the cluster",
            details={"central": central[:64]},
        )
    return central_link()
