"""Cluster services: join, reports, event forwarding, the preflight's cluster check, and the
rolling upgrade ("Upgrade cluster": Cluster Central first, then each member in sequence).

Nodes share nothing but the Redis broker: each has its own appliance root, database and worker
consuming ``lmi.node.<name>``. Everything one node tells another is a Celery message sent with
``_send`` after the sender's transaction commits: one JSON envelope, signed with a key only the
two nodes hold (``cluster.signing``: the join token's key for the join, the member's key after
it). The receiving task calls one of the ``*_receive`` services here, which opens the envelope
before anything else and refuses (one WARNING event) a message that is forged, altered,
replayed, stale or not for this node. Messages can arrive twice or late, so every receiver is
idempotent (cursors, conditional updates, an upgrade id on every install request).

Roles (settings.CLUSTER_ROLE): ``standalone`` (none of this applies), ``central``, ``member``.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import IntegrityError, transaction
from django.db.models import Case, F, When
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from appliance.system.errors import ApplianceError
from cluster import signing
from cluster.models import (
    CentralLink,
    ClusterMember,
    ClusterUpgrade,
    JoinState,
    JoinToken,
    NodeStep,
    UpgradeState,
)
from events.models import Category, Event, Severity
from events.services import event_write, username_of
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import JobState
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


def _send(kind: str, node: str, key: str, body: dict[str, Any]) -> None:
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
}


def _open(
    message: Any, *, kind: str, key: signing.KeyFor, origin: str = ""
) -> signing.Opened | None:
    """Open a received ``kind`` message addressed to this node (``signing.open_sealed``, with
    ``key`` finding the claimed sender's key); None when it is refused, after its event."""
    try:
        return signing.open_sealed(message, kind=kind, recipient=settings.NODE_NAME, key=key)
    except signing.Refused as exc:
        _refusal_event(kind, message, str(exc), origin=origin)
        return None


def _refusal_event(kind: str, message: Any, reason: str, *, origin: str = "") -> None:
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


def _member_key(sender: str, _body: dict[str, Any]) -> str:
    """Central: the key of messages from the member ``sender``."""
    member = ClusterMember.objects.filter(node=sender).first()
    if member is None:
        raise signing.Refused("it is not a member of this cluster")
    return member.secret_hash


def _central_key(link: CentralLink, sender: str) -> str:
    """A member: the key of messages from our Cluster Central ``sender``."""
    if not link.secret:
        raise signing.Refused("this node is not a member of a cluster")
    if sender != link.central:
        raise signing.Refused(f"this node's Cluster Central is {link.central}")
    return signing.member_key(link.secret)


def _open_from_central(
    link: CentralLink,
    message: Any,
    *,
    kind: str,
    key: Callable[[CentralLink, str], str] = _central_key,
) -> signing.Opened | None:
    """A member: open a received ``kind`` message with the key ``key`` finds in our ``link``
    for its sender (``_open``: None when it is refused, after its event)."""
    return _open(message, kind=kind, key=lambda sender, _body: key(link, sender))


def cluster_role() -> str:
    return settings.CLUSTER_ROLE


def _require(role: str, action: str) -> None:
    if cluster_role() != role:
        names = {CENTRAL: "Cluster Central", MEMBER: "a cluster member"}
        raise ClusterError(
            f"{action} is done on {names[role]}; this node ({settings.NODE_NAME}) is "
            f"{cluster_role()} (LMI_CLUSTER_ROLE)."
        )


def _version_or_blank(value: Any) -> str:
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


def _link() -> CentralLink:
    link, _ = CentralLink.objects.get_or_create(pk=1)
    return link


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
    _require(CENTRAL, "Creating a join token")
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
    _require(CENTRAL, "Accepting members")
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
                    firmware_version=_version_or_blank(info.get("firmware")),
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
        opened = _open(message, kind="member_join", key=_join_token_key, origin=origin)
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
                _send("join_answer", node, key, answer)
            return False
        answer = {
            "accepted": True,
            "message": "",
            "secret": signing.secret_encrypt(key, secret),
            "firmware": local_firmware(),
        }
        _send("join_answer", node, key, answer)
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
    clean["version"] = _version_or_blank(value.get("version"))
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
        opened = _open(message, kind="member_report", key=_member_key)
        if opened is None:
            return None
        report = opened.body.get("report")
        report = report if isinstance(report, dict) else {}
        member = ClusterMember.objects.select_for_update().get(node=opened.sender)
        was_reachable = member.reachable
        health = _clean_health(report.get("health"))
        member.firmware_version = (
            _version_or_blank(report.get("firmware")) or member.firmware_version
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
        _send(
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
        if ClusterMember.objects.filter(pk=member.pk, reachable=True).update(reachable=False):
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


# --- Member: joining, reporting, answers from Central -------------------------------------


def cluster_join_request(*, token: str, user: User = None) -> CentralLink:
    """Member: ask Central (settings.CLUSTER_CENTRAL) to accept this node with a join token.

    The token itself is not sent, nor kept: the request names it by its SHA-256 and is signed
    with the join's key (both derived from it, ``cluster.signing``); the key waits in the link
    for Central's answer, which is signed with it and carries our secret encrypted under it.
    """
    _require(MEMBER, "Joining a cluster")
    token = (token or "").strip()
    if not TOKEN_RE.fullmatch(token):
        raise ClusterError(
            "That is not a join token (create one on Cluster Central's Cluster page)."
        )
    central = settings.CLUSTER_CENTRAL
    key = signing.join_key(token)
    with transaction.atomic():
        link = _link()
        link.central = central
        link.state = JoinState.PENDING
        link.join_key = key
        link.error = ""
        link.requested_at = timezone.now()
        link.save()
        info = {"hostname": socket.gethostname(), "firmware": local_firmware()}
        _send("member_join", central, key, {"token": signing.token_hash(token), "info": info})
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
        link = _link()
        opened = _open_from_central(link, message, kind="join_answer", key=_pending_join_key)
        if opened is None:
            return None
        central = opened.sender
        accepted = opened.body.get("accepted") is True
        text = str(opened.body.get("message") or "")
        if accepted:
            try:
                secret = signing.secret_decrypt(link.join_key, opened.body.get("secret"))
            except signing.Refused as exc:
                _refusal_event("join_answer", message, str(exc))
                return None
            changed = CentralLink.objects.filter(pk=1, state=JoinState.PENDING).update(
                state=JoinState.JOINED,
                central=central[:64],
                secret=secret[:100],
                join_key="",
                error="",
                joined_at=now,
                central_firmware=_version_or_blank(opened.body.get("firmware")),
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
            transaction.on_commit(_report_soon)
    return _link()


def _report_soon() -> None:
    from lmi.celery import app

    app.send_task("cluster.tasks.member_tick", queue=node_queue(settings.NODE_NAME))


def central_update_receive(*, message: Any) -> None:
    """Member: Central's answer to a report (its firmware level, the events it has stored),
    signed with our key."""
    if cluster_role() != MEMBER:
        return
    with transaction.atomic():
        link = _link()
        opened = _open_from_central(link, message, kind="central_update")
        if opened is None or link.state != JoinState.JOINED:
            return
        fields: dict[str, Any] = {"central_seen_at": timezone.now()}
        level = _version_or_blank(opened.body.get("firmware"))
        if level:
            fields["central_firmware"] = level
        events_cursor = opened.body.get("events_cursor")
        if isinstance(events_cursor, int):
            fields["events_acked"] = max(link.events_acked, events_cursor)
        CentralLink.objects.filter(pk=1).update(**fields)


def member_report_build() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Member: the report (firmware, health, install, our rolling-upgrade answer) and the next
    batch of events Central has not confirmed."""
    link = _link()
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
    link = _link()
    if link.state != JoinState.JOINED:
        return False
    report, events = member_report_build()
    with transaction.atomic():
        CentralLink.objects.filter(pk=1).update(last_report_at=timezone.now())
        _send(
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
    if _link().state != JoinState.NOT_JOINED:
        return False
    cluster_join_request(token=settings.CLUSTER_JOIN_TOKEN, user="cluster")
    return True


# --- Member: Central asks us to install (rolling upgrade) ---------------------------------


def member_install_start(*, message: Any) -> CentralLink | None:
    """Member, the node_install_start task: start our own install of the version Central's
    rolling upgrade asks for. Delivered twice (or asked again), it starts nothing twice for one
    upgrade id. The answer (run id or why not) goes with an immediate report.

    The request must be signed with our key by our Central: a writer to the broker who knows
    Central's name starts nothing. Its nonce is recorded before the install starts, outside a
    transaction (an install start takes a backup, too long to hold a write transaction for):
    if the worker dies in between, a redelivery is refused and Central asks again once the
    request is older than ``signing.MAX_AGE`` (``_step_member``).
    """
    if cluster_role() != MEMBER:
        return None
    link = _link()
    opened = _open_from_central(link, message, kind="node_install_start")
    if opened is None:
        return None
    central = opened.sender
    upgrade_id = opened.body.get("upgrade_id")
    version = str(opened.body.get("version") or "")[:32]
    central_firmware = opened.body.get("central_firmware")
    if not isinstance(upgrade_id, int) or isinstance(upgrade_id, bool):
        return None
    if link.state != JoinState.JOINED:
        logger.warning("ignoring an install request from %r: not joined", central)
        return None
    if link.upgrade_id == upgrade_id:
        transaction.on_commit(_report_soon)
        return link
    level = _version_or_blank(central_firmware)
    if level:
        CentralLink.objects.filter(pk=1).update(
            central_firmware=level, central_seen_at=timezone.now()
        )
    run_id, error = _start_local_install(version, user=f"Cluster Central {central}")
    CentralLink.objects.filter(pk=1).update(
        upgrade_id=upgrade_id,
        upgrade_version=_version_or_blank(version),
        upgrade_run_id=run_id,
        upgrade_error=error[:1000],
    )
    event_write(
        category=Category.CLUSTER,
        severity=Severity.INFO if not error else Severity.ERROR,
        message=f"Cluster Central {central} asked for firmware {version}: "
        + (f"install {run_id} started" if not error else f"not started: {error}"),
        details={"upgrade_id": upgrade_id, "run_id": run_id, "version": version},
    )
    transaction.on_commit(_report_soon)
    return _link()


def _start_local_install(version: str, *, user: str) -> tuple[int | None, str]:
    """Start this node's install of ``version``; (run id, "") or (None, why not)."""
    try:
        from upgrades import install
        from upgrades.selectors import ready_download
    except ImportError:
        return None, "this console has no install engine"
    installed = local_firmware()
    ready = ready_download(installed or None)
    if ready is None:
        return (
            None,
            f"no firmware download is ready on {settings.NODE_NAME}: download {version} first",
        )
    if ready.version != version:
        return None, f"the firmware ready on {settings.NODE_NAME} is {ready.version}, not {version}"
    try:
        run = install.install_start(user=user, trigger="cluster")
    except install.InstallError as exc:
        return None, str(exc) or exc.__class__.__name__
    return run.pk, ""


# --- Central: the rolling upgrade ----------------------------------------------------------


def cluster_target_version() -> str | None:
    """What "Upgrade cluster" installs: the firmware ready on Central (newer than it runs), or,
    when Central is already upgraded, the level Central runs (members catch up)."""
    from upgrades.selectors import ready_download

    installed = local_firmware()
    ready = ready_download(installed or None)
    if ready is not None:
        return ready.version
    return installed or None


CLUSTER_UPGRADE_KIND = "cluster_upgrade"
UPGRADE_JOB_OUTCOME = {
    UpgradeState.SUCCEEDED: JobState.SUCCEEDED,
    UpgradeState.STOPPED: JobState.FAILED,
}


def register_job_kind() -> None:
    """The rolling upgrade's kind of the job engine (ClusterConfig.ready): driven by
    cluster_upgrade_advance from the members' reports and beat, never held by a worker."""
    jobs_registry.register(
        jobs_registry.Kind(
            name=CLUSTER_UPGRADE_KIND,
            label="Cluster upgrade",
            category=Category.CLUSTER,
            driven=True,
            own_events=True,
        )
    )


def cluster_upgrade_start(*, user: User) -> ClusterUpgrade:
    """Central: start "Upgrade cluster" (Central first, then each member in node order)."""
    _require(CENTRAL, "Upgrade cluster")
    version = cluster_target_version()
    if not version:
        raise ClusterError("Cluster Central's firmware level is not known.")
    members = list(ClusterMember.objects.order_by("node"))
    behind = [m for m in members if m.firmware_version != version]
    if local_firmware() == version and not behind:
        raise ClusterError(f"Every node already runs {version}: there is nothing to upgrade.")
    silent = [m.node for m in members if not m.reachable]
    if silent:
        raise ClusterError(
            f"{', '.join(silent)} {'is' if len(silent) == 1 else 'are'} unreachable: bring "
            "every member back (or let it report) before upgrading the cluster."
        )
    order = [settings.NODE_NAME, *[m.node for m in members]]
    try:
        with transaction.atomic():
            job = jobs_engine.start_driven(
                CLUSTER_UPGRADE_KIND,
                title=f"Cluster upgrade to {version}",
                user=user,
                conflict_group=CLUSTER_UPGRADE_KIND,
                steps=len(order),
                details={"version": version, "order": order},
            )
            upgrade = ClusterUpgrade.objects.create(
                version=version,
                order=order,
                current_node=order[0],
                results={node: {"state": NodeStep.PENDING} for node in order},
                started_by=username_of(user)[:150],
                step_started_at=timezone.now(),
                job=job,
            )
    except (IntegrityError, jobs_engine.JobConflict) as exc:
        raise ClusterError("A cluster upgrade is already running.") from exc
    event_write(
        category=Category.CLUSTER,
        message=f"Cluster upgrade to {version} started: {', '.join(order)}, in this order",
        user=user,
        details={"upgrade_id": upgrade.pk, "order": order, "version": version},
    )
    cluster_upgrade_advance()
    upgrade.refresh_from_db()
    return upgrade


def _timed_out(upgrade: ClusterUpgrade) -> bool:
    started = upgrade.step_started_at or upgrade.created_at
    return timezone.now() - started > timedelta(seconds=settings.CLUSTER_NODE_UPGRADE_TIMEOUT)


def _step_central(upgrade: ClusterUpgrade, result: dict[str, Any]) -> dict[str, Any]:
    """Central's own step: start the local install, then follow its run."""
    state = result.get("state", NodeStep.PENDING)
    if state == NodeStep.PENDING:
        if local_firmware() == upgrade.version:
            return {"state": NodeStep.SKIPPED}
        run_id, error = _start_local_install(upgrade.version, user=upgrade.started_by or "cluster")
        if error:
            return {"state": NodeStep.FAILED, "error": error}
        return {"state": NodeStep.INSTALLING, "run_id": run_id}
    from upgrades.models import InstallRun

    run = InstallRun.objects.filter(pk=result.get("run_id")).first()
    if run is None:
        return {**result, "state": NodeStep.FAILED, "error": "its install run is gone"}
    if run.state == "succeeded":
        if local_firmware() != upgrade.version:
            return {
                **result,
                "state": NodeStep.FAILED,
                "error": f"the install succeeded but it runs {local_firmware() or '?'}",
            }
        return {**result, "state": NodeStep.DONE, "percent": 100.0}
    if run.state in INSTALL_FAILED:
        return {**result, "state": NodeStep.FAILED, "error": f"install {run.state}: {run.error}"}
    return {**result, "phase": run.phase, "percent": local_install().get("percent", 0.0)}


def _step_member(upgrade: ClusterUpgrade, node: str, result: dict[str, Any]) -> dict[str, Any]:
    """A member's step: send it the install request, then follow its reports."""
    member = ClusterMember.objects.filter(node=node).first()
    if member is None:
        return {**result, "state": NodeStep.FAILED, "error": "it is no longer a member"}
    state = result.get("state", NodeStep.PENDING)
    if state == NodeStep.PENDING:
        if member.firmware_version == upgrade.version and member.healthy:
            return {"state": NodeStep.SKIPPED}
        _request_install(upgrade, member)
        return {"state": NodeStep.REQUESTED, "requested_at": timezone.now().isoformat()}
    answer = member.upgrade_answer
    if answer.get("upgrade_id") != upgrade.pk:
        # The member has not handled the request yet. Once the request is older than a
        # member accepts (signing.MAX_AGE) it never will: it was lost, or waited too long in
        # a busy queue. Ask again (the member starts nothing twice for one upgrade id).
        requested = parse_datetime(str(result.get("requested_at") or ""))
        if state == NodeStep.REQUESTED and (
            requested is None or timezone.now() - requested > signing.MAX_AGE
        ):
            _request_install(upgrade, member)
            return {
                **result,
                "requested_at": timezone.now().isoformat(),
                "requests": int(result.get("requests", 1)) + 1,
            }
        return result
    if answer.get("error"):
        return {**result, "state": NodeStep.FAILED, "error": f"refused: {answer['error']}"}
    install = member.install
    if install.get("run_id") != answer.get("run_id"):
        return result
    run_state = install.get("state")
    progress = {"run_id": answer.get("run_id"), "phase": install.get("phase", 0)}
    if run_state == "succeeded":
        if member.firmware_version == upgrade.version and member.healthy:
            return {**result, **progress, "state": NodeStep.DONE, "percent": 100.0}
        waiting = "for a healthy report on the new version"
        return {**result, **progress, "state": NodeStep.INSTALLING, "waiting": waiting}
    if run_state in INSTALL_FAILED:
        why = install.get("error") or run_state
        return {
            **result,
            **progress,
            "state": NodeStep.FAILED,
            "error": f"install {run_state}: {why}",
        }
    percent = install.get("percent", 0.0)
    return {**result, **progress, "state": NodeStep.INSTALLING, "percent": percent}


def _request_install(upgrade: ClusterUpgrade, member: ClusterMember) -> None:
    """Send a member the rolling upgrade's install request (node_install_start)."""
    _send(
        "node_install_start",
        member.node,
        member.secret_hash,
        {
            "upgrade_id": upgrade.pk,
            "version": upgrade.version,
            "central_firmware": local_firmware(),
        },
    )


def cluster_upgrade_advance() -> ClusterUpgrade | None:
    """Central: move the running rolling upgrade on as far as the facts allow.

    Called when a member's report arrives and from beat (never a self-rescheduling task). The
    current node's step is evaluated; when it is done (or skipped) the next node's step starts
    in the same call; the first failure stops the whole upgrade with that node and why.
    Changes are one conditional update on ``revision``; the loser of a race does nothing.
    """
    if cluster_role() != CENTRAL:
        return None
    with transaction.atomic():
        upgrade = ClusterUpgrade.objects.filter(state=UpgradeState.RUNNING).first()
        if upgrade is None:
            return None
        revision = upgrade.revision
        results = {node: dict(value) for node, value in upgrade.results.items()}
        current = upgrade.current_node
        step_started = upgrade.step_started_at
        state, error, stopped_node = UpgradeState.RUNNING, "", ""
        notes: list[tuple[str, Severity]] = []
        while True:
            before = results.get(current, {})
            if current == settings.NODE_NAME:
                after = _step_central(upgrade, before)
            else:
                after = _step_member(upgrade, current, before)
            step = after.get("state")
            waiting = (NodeStep.PENDING, NodeStep.REQUESTED, NodeStep.INSTALLING)
            if step in waiting and _timed_out(upgrade):
                after = {
                    **after,
                    "state": NodeStep.FAILED,
                    "error": f"no result within {settings.CLUSTER_NODE_UPGRADE_TIMEOUT} s",
                }
                step = NodeStep.FAILED
            if after != before:
                after.setdefault(
                    "started_at", before.get("started_at") or timezone.now().isoformat()
                )
            results[current] = after
            if step == NodeStep.FAILED:
                after["finished_at"] = timezone.now().isoformat()
                state, stopped_node = UpgradeState.STOPPED, current
                error = f"{current}: {after.get('error', 'failed')}"
                notes.append(
                    (f"Cluster upgrade to {upgrade.version} stopped at {error}", Severity.ERROR)
                )
                break
            if step not in (NodeStep.DONE, NodeStep.SKIPPED):
                break
            after["finished_at"] = timezone.now().isoformat()
            notes.append(
                (
                    f"Cluster upgrade: {current} "
                    f"{'runs' if step == NodeStep.DONE else 'already ran'} {upgrade.version}",
                    Severity.INFO,
                )
            )
            position = upgrade.order.index(current)
            if position + 1 >= len(upgrade.order):
                state = UpgradeState.SUCCEEDED
                notes.append((f"Cluster upgrade to {upgrade.version} complete", Severity.INFO))
                break
            current = upgrade.order[position + 1]
            step_started = timezone.now()
            upgrade.step_started_at = step_started
        if results == upgrade.results and state == UpgradeState.RUNNING:
            return upgrade
        finished = timezone.now() if state != UpgradeState.RUNNING else None
        updated = ClusterUpgrade.objects.filter(
            pk=upgrade.pk, revision=revision, state=UpgradeState.RUNNING
        ).update(
            results=results,
            current_node=current,
            step_started_at=step_started,
            state=state,
            error=error,
            stopped_node=stopped_node,
            finished_at=finished,
            revision=revision + 1,
        )
        if updated != 1:
            # Another advance won the race: undo our side effects (queued sends, an install
            # row) with the transaction and let the winner's state stand.
            transaction.set_rollback(True)
            return ClusterUpgrade.objects.filter(pk=upgrade.pk).first()
        if upgrade.job_id is not None:
            step = results.get(current, {}).get("state", NodeStep.PENDING)
            label = NodeStep(step).label if step in NodeStep.values else str(step)
            jobs_engine.drive(
                upgrade.job_id,
                step=upgrade.order.index(current),
                step_name=f"{current}: {label}",
                final=UPGRADE_JOB_OUTCOME.get(state),
                error=error,
            )
        for message, severity in notes:
            event_write(
                category=Category.CLUSTER,
                severity=severity,
                message=message,
                user=upgrade.started_by,
                details={"upgrade_id": upgrade.pk},
            )
    upgrade.refresh_from_db()
    return upgrade


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
    _require(CENTRAL, "Removing a member")
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
        _send("member_removed", member.node, member.secret_hash, {})


def member_removed_receive(*, message: Any) -> CentralLink | None:
    """Member, the member_removed task: our Central forgot us. Drop the secret (it is worth
    nothing now) and go back to not joined, so the Cluster page offers the join form again.
    ``events_acked`` stays: Central keeps the events it stored, a re-join sends only newer ones.

    The notice must be signed with our key by our Central: nobody else can cut a member off.
    """
    if cluster_role() != MEMBER:
        return None
    with transaction.atomic():
        opened = _open_from_central(_link(), message, kind="member_removed")
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
    return _link()
