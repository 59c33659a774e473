"""Cluster services of Central: join tokens and joins, reports and event forwarding, removing
a member. What a member does (joining, reporting, answering Central) is
:mod:`cluster.member_services`.

Nodes share nothing but the Redis broker: each has its own appliance root, database and worker
consuming ``lmi.node.<name>``. Every message goes through cluster.plumbing (``send`` after the
sender's transaction commits, ``open_sealed`` before anything else on arrival); messages can
arrive twice or late, so every receiver here is idempotent (cursors, conditional updates). The
rolling upgrade is cluster.rolling; a member's report moves it on.

Roles (settings.CLUSTER_ROLE): ``standalone`` (none of this applies), ``central``, ``member``.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from cluster import signing
from cluster.models import (
    ClusterMember,
    JoinToken,
)
from cluster.plumbing import (
    CENTRAL,
    MAX_EVENTS_PER_REPORT,
    NODE_NAME_RE,
    STAGE_RE,
    TOKEN_HASH_RE,
    TOKEN_LIFETIME,
    JoinRefused,
    NotAMember,
    User,
    cluster_role,
    local_firmware,
    member_key,
    open_sealed,
    require,
    send,
    version_or_blank,
)
from cluster.rolling import cluster_upgrade_advance
from events.models import Category, Severity
from events.services import event_write, username_of

logger = logging.getLogger(__name__)

# --- Central: join tokens and joins --------------------------------------------------------


def _new_token() -> str:
    """A URL-safe token that does not start with '-', so ``cluster_join TOKEN`` never reads it
    as an option (one in 64 would otherwise)."""
    token = secrets.token_urlsafe(24)
    while token.startswith("-"):
        token = secrets.token_urlsafe(24)
    return token


def join_token_create(*, user: User) -> tuple[JoinToken, str]:
    """Create a single-use join token valid for 24 hours; the token itself is returned once."""
    require(CENTRAL, "Creating a join token")
    token = _new_token()
    row = JoinToken.objects.create(
        token_hash=signing.token_hash(token),
        key=signing.join_key(token),
        created_by=username_of(user)[:150],
        expires_at=timezone.now() + TOKEN_LIFETIME,
    )
    event_write(
        category=Category.CLUSTER,
        message="Created a cluster join token (valid 24 hours, single use)",
        user=user,
        details={"token_id": row.pk, "expires_at": row.expires_at.isoformat()},
    )
    return row, token


def _refuse_join(
    node: str, reason: str, *, origin: str = "", hostname: str = "", token_id: int | None = None
) -> JoinRefused:
    """Write the WARNING event of a refused join and return the exception to raise.

    The event says where the attempt came from as far as Central can tell: the sending worker
    from Celery's message (``gen123@host``) and the hostname the request claims. A join
    travels over the broker, so there is no network address to record, and both can be
    forged: they help an administrator find a misconfigured node, they prove nothing.
    """
    where = [f"sent by {origin}" if origin else "", f"hostname {hostname}" if hostname else ""]
    source = "; ".join(part for part in where if part)
    event_write(
        category=Category.CLUSTER,
        severity=Severity.WARNING,
        message=f"Refused a join request from {node[:64]!r}: {reason}"
        + (f" ({source})" if source else ""),
        details={
            "node": node[:64],
            "reason": reason,
            "origin": origin,
            "hostname": hostname,
            **({"token_id": token_id} if token_id is not None else {}),
        },
    )
    return JoinRefused(reason)


def member_join(
    *, node: str, token_hash: str, info: dict[str, Any], origin: str = ""
) -> tuple[ClusterMember, str]:
    """Central: check a join token (named by its SHA-256) and register a new member under a
    free node name. Called with a verified join request (``join_request_receive``).

    Returns the member and its secret (whose SHA-256 is the key of every message between
    them). Refusals write a WARNING event and raise JoinRefused.

    A name already taken by a member (whatever its state, reachable or not) is refused: a join
    never replaces a member's secret, or any holder of a join token could take over a member's
    name, its place in a rolling upgrade and the trust Central gives its reports. An
    administrator removes the member first (``member_remove``); then the name is free again.

    A refused attempt on a taken name *spends* the token. Keeping it unspent would let whoever
    holds it (an attacker probing names, or a leaked token) try again later, for example in
    the window after an administrator removes a member to re-join it; spending it costs a
    legitimate administrator only a new token, and the event says which token went. Tokens
    refused for being malformed, unknown, used or expired, and bad node names, change nothing.

    ``origin`` is the sending worker as Celery's message says (``gen123@host``), for the event.
    """
    require(CENTRAL, "Accepting members")
    node = str(node)
    info = info if isinstance(info, dict) else {}
    source = {
        "origin": str(origin or "")[:100],
        "hostname": str(info.get("hostname") or "")[:255],
    }
    if not NODE_NAME_RE.fullmatch(node):
        raise _refuse_join(node, "the node name is not valid", **source)
    if node == settings.NODE_NAME:
        raise _refuse_join(node, "the member has Cluster Central's own node name", **source)
    if not isinstance(token_hash, str) or not TOKEN_HASH_RE.fullmatch(token_hash):
        raise _refuse_join(node, "the join token is not valid", **source)
    now = timezone.now()
    row = JoinToken.objects.filter(token_hash=token_hash).first()
    if row is None:
        raise _refuse_join(node, "the join token is not valid", **source)
    if row.used_at is not None:
        raise _refuse_join(node, "the join token was already used", **source)
    if row.expires_at <= now:
        raise _refuse_join(node, "the join token has expired", **source)
    secret = secrets.token_urlsafe(32)
    member: ClusterMember | None = None
    with transaction.atomic():
        spent = JoinToken.objects.filter(pk=row.pk, used_at__isnull=True).update(
            used_at=now, used_by=node
        )
        if spent != 1:
            raise JoinRefused("the join token was already used")
        try:
            # The unique node name decides, not a read before it: two joins racing for one
            # free name with two tokens cannot both win. The savepoint keeps the spend.
            with transaction.atomic():
                member = ClusterMember.objects.create(
                    node=node,
                    secret_hash=signing.member_key(secret),
                    hostname=source["hostname"],
                    firmware_version=version_or_blank(info.get("firmware")),
                    joined_at=now,
                    last_seen=now,
                    reachable=True,
                )
        except IntegrityError:
            member = None
    if member is None:
        raise _refuse_join(
            node,
            f"the node name {node} is taken by a member of this cluster: an administrator "
            "must remove that member on Cluster Central first (this join token is now spent)",
            **source,
            token_id=row.pk,
        )
    event_write(
        category=Category.CLUSTER,
        message=f"{node} joined the cluster",
        details={"node": node, "firmware": member.firmware_version, "token_id": row.pk},
    )
    return member, secret


def _join_token_key(_sender: str, body: dict[str, Any]) -> str:
    """Central: the key of a join request, found by the token hash its body names."""
    token_hash = body.get("token")
    if not isinstance(token_hash, str) or not TOKEN_HASH_RE.fullmatch(token_hash):
        raise signing.Refused("the join token is not valid")
    row = JoinToken.objects.filter(token_hash=token_hash).first()
    if row is None:
        raise signing.Refused("the join token is not valid")
    if not row.key:
        raise signing.Refused(
            "the join token was created before messages between nodes were signed: create a new one"
        )
    return row.key


def join_request_receive(*, message: Any, origin: str = "") -> bool:
    """Central, the member_join task: open the request, join, then answer on the member's queue.

    The request is signed with the join token's key, so only a holder of the token can make
    one; the name it claims (its sender) is then checked by ``member_join``. The answer is
    signed with the same key and carries the member secret encrypted under it. A refusal is
    answered too (with why), so the joining node's Cluster page says it; it goes to the queue
    of the name the request claims, the only address Central has for it. A request Central
    cannot verify (unknown token, wrong signature, replay) is not answered: an answer it
    could sign would tell nothing to whoever sent it, and its event is on Central.
    """
    if cluster_role() != CENTRAL:
        logger.warning("ignoring a join request: this node is not Cluster Central")
        return False
    with transaction.atomic():
        opened = open_sealed(message, kind="member_join", key=_join_token_key, origin=origin)
        if opened is None:
            return False
        key = _join_token_key(opened.sender, opened.body)
        node = opened.sender
        info = opened.body.get("info")
        try:
            _member, secret = member_join(
                node=node, token_hash=opened.body["token"], info=info, origin=origin
            )
        except JoinRefused as exc:
            if NODE_NAME_RE.fullmatch(node):
                answer = {"accepted": False, "message": str(exc), "secret": "", "firmware": ""}
                send("join_answer", node, key, answer)
            return False
        answer = {
            "accepted": True,
            "message": "",
            "secret": signing.secret_encrypt(key, secret),
            "firmware": local_firmware(),
        }
        send("join_answer", node, key, answer)
    return True


# --- Central: reports ----------------------------------------------------------------------


def _clean_health(value: Any) -> dict[str, bool]:
    if not isinstance(value, dict):
        return {}
    return {str(k)[:32]: bool(v) for k, v in list(value.items())[:16]}


def _clean_install(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    clean: dict[str, Any] = {}
    for key in ("run_id", "phase"):
        if isinstance(value.get(key), int):
            clean[key] = value[key]
    if isinstance(value.get("percent"), int | float):
        clean["percent"] = max(0.0, min(100.0, float(value["percent"])))
    for key in ("state", "trigger", "error"):
        if isinstance(value.get(key), str):
            clean[key] = value[key][:500]
    if isinstance(value.get("story"), str) and value["story"].isprintable():
        clean["story"] = value["story"][:300]
    if isinstance(value.get("stage"), str) and STAGE_RE.fullmatch(value["stage"]):
        clean["stage"] = value["stage"]
    clean["version"] = version_or_blank(value.get("version"))
    return clean


def _clean_answer(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("upgrade_id"), int):
        return {}
    run_id = value.get("run_id")
    return {
        "upgrade_id": value["upgrade_id"],
        "run_id": run_id if isinstance(run_id, int) else None,
        "error": str(value.get("error") or "")[:1000],
    }


def _store_events(member: ClusterMember, events: Any) -> int:
    """Store a member's events above its cursor, with the member's node name and times."""
    if not isinstance(events, list):
        return member.events_cursor
    cursor = member.events_cursor
    categories = set(Category.values)
    severities = {int(s) for s in Severity}
    for item in sorted(
        (e for e in events[:MAX_EVENTS_PER_REPORT] if isinstance(e, dict)),
        key=lambda e: e.get("id") if isinstance(e.get("id"), int) else -1,
    ):
        remote_id = item.get("id")
        if not isinstance(remote_id, int) or remote_id <= cursor:
            continue
        created = parse_datetime(str(item.get("created_at") or "")) or timezone.now()
        severity = item.get("severity")
        category = item.get("category")
        details = item.get("details") if isinstance(item.get("details"), dict) else {}
        event_write(
            category=category if category in categories else Category.CLUSTER,
            severity=severity if severity in severities else Severity.INFO,
            message=str(item.get("message") or "")[:500],
            user=str(item.get("username") or "")[:150],
            details={**details, "member_event_id": remote_id},
            node=member.node,
            created_at=created,
        )
        cursor = remote_id
    return cursor


def member_report_receive(*, message: Any) -> ClusterMember | None:
    """Central, the member_report task: update the member, store its new events, advance a
    rolling upgrade, and answer with Central's firmware level and the events cursor.

    The report must be signed with the member's key: one from a node that is not a member, or
    not signed by it, is refused (an event) and changes nothing.
    """
    if cluster_role() != CENTRAL:
        logger.warning("ignoring a cluster report: this node is not Central")
        return None
    now = timezone.now()
    with transaction.atomic():
        opened = open_sealed(message, kind="member_report", key=member_key)
        if opened is None:
            return None
        report = opened.body.get("report")
        report = report if isinstance(report, dict) else {}
        member = ClusterMember.objects.select_for_update().get(node=opened.sender)
        was_reachable = member.reachable
        health = _clean_health(report.get("health"))
        member.firmware_version = (
            version_or_blank(report.get("firmware")) or member.firmware_version
        )
        member.hostname = str(report.get("hostname") or member.hostname)[:255]
        member.health = health
        member.healthy = bool(health.get("healthy"))
        member.install = _clean_install(report.get("install"))
        member.upgrade_answer = _clean_answer(report.get("cluster_upgrade"))
        member.last_seen = now
        member.reachable = True
        member.reports += 1
        member.events_cursor = _store_events(member, opened.body.get("events"))
        member.save()
        if not was_reachable:
            event_write(
                category=Category.CLUSTER,
                message=f"{member.node} is reachable again",
                details={"node": member.node},
            )
        send(
            "central_update",
            member.node,
            member.secret_hash,
            {"firmware": local_firmware(), "events_cursor": member.events_cursor},
        )
    cluster_upgrade_advance()
    return member


def members_mark_unreachable() -> list[str]:
    """Central, beat: members silent for CLUSTER_UNREACHABLE_REPORTS report intervals."""
    limit = timezone.now() - timedelta(
        seconds=settings.CLUSTER_REPORT_SECONDS * settings.CLUSTER_UNREACHABLE_REPORTS
    )
    marked = []
    for member in ClusterMember.objects.filter(reachable=True, last_seen__lt=limit):
        # One commit: whoever sees the member unreachable also sees the event that says why.
        with transaction.atomic():
            if not ClusterMember.objects.filter(pk=member.pk, reachable=True).update(
                reachable=False
            ):
                continue
            marked.append(member.node)
            event_write(
                category=Category.CLUSTER,
                severity=Severity.WARNING,
                message=f"{member.node} is unreachable: no report since "
                f"{member.last_seen:%Y-%m-%d %H:%M:%S}",
                details={"node": member.node, "last_seen": member.last_seen.isoformat()},
            )
    return marked


def central_tick() -> None:
    """Central, beat: mark silent members unreachable and advance a rolling upgrade."""
    if cluster_role() != CENTRAL:
        return
    members_mark_unreachable()
    cluster_upgrade_advance()


def member_remove(*, node: str, user: User) -> None:
    """Central: forget a member: its row goes, with its secret and its latest report.

    This is how a name is freed for a new join (``member_join`` refuses a taken name). The
    member's events already stored here stay in the event log. The delete is conditional on
    the row still being there, so two administrators removing at once write one event and the
    second is told. The member is told too (``member_removed``, after commit): it forgets its
    secret and shows that it must join again; until then it runs on alone. If that message is
    lost, its reports are ignored all the same (Central no longer knows its secret).

    A running cluster upgrade that has not passed the node stops when it reaches it ("no
    longer a member"), as it would for a member that vanished.
    """
    require(CENTRAL, "Removing a member")
    with transaction.atomic():
        member = ClusterMember.objects.filter(node=str(node)).first()
        deleted = 0
        if member is not None:
            deleted, _ = ClusterMember.objects.filter(pk=member.pk).delete()
        if member is None or not deleted:
            raise NotAMember(f"{node} is not a member of this cluster.")
        event_write(
            category=Category.CLUSTER,
            severity=Severity.WARNING,
            message=f"Removed {node} from the cluster: it must join again with a new token",
            user=user,
            details={"node": node},
        )
        # Signed with the key being forgotten: the last message the two nodes share.
        send("member_removed", member.node, member.secret_hash, {})
