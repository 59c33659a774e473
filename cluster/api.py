"""/api/v1/cluster: the Cluster page as JSON; join tokens, removing a member, "Upgrade cluster".

The same selectors and services as the page; every change needs an administrator.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema, Status

from api.auth import require_administrator
from api.schemas import Problem
from cluster import plumbing, rolling, selectors, services

router = Router(tags=["cluster"])


class MemberOut(Schema):
    node: str
    hostname: str
    firmware_version: str
    healthy: bool
    health: dict[str, bool]
    reachable: bool
    last_seen: str | None
    joined_at: str | None
    install_running: bool
    install: dict[str, Any]


class StepOut(Schema):
    node: str
    state: str
    label: str
    current: bool
    percent: float | None
    phase: int | None
    error: str
    run_id: int | None
    started_at: str | None
    finished_at: str | None


class UpgradeOut(Schema):
    id: int
    version: str
    state: str
    state_label: str
    current_node: str
    started_by: str
    created_at: str | None
    finished_at: str | None
    error: str
    stopped_node: str
    steps: list[StepOut]


class LinkOut(Schema):
    central: str
    state: str
    state_label: str
    error: str
    joined_at: str | None
    central_firmware: str
    central_seen_at: str | None
    last_report_at: str | None
    upgrade_id: int | None
    upgrade_run_id: int | None
    upgrade_error: str


class ClusterOut(Schema):
    role: str
    node: str
    firmware_version: str
    central: str
    members: list[MemberOut]
    versions_notice: str
    upgrade: UpgradeOut | None
    link: LinkOut | None
    target_version: str | None


class TokenOut(Schema):
    token: str
    expires_at: str


@router.get("", response=ClusterOut)
def cluster(request: HttpRequest) -> dict[str, Any]:
    """This node's role, Cluster Central, the members (on Central) or the link (on a member),
    and the latest rolling upgrade."""
    return selectors.cluster_overview()


@router.post("/tokens", response={201: TokenOut, 409: Problem})
def token_create(request: HttpRequest):
    """Create a single-use join token (valid 24 hours); the token is returned only here."""
    require_administrator(request)
    try:
        row, token = services.join_token_create(user=request.auth)  # type: ignore[attr-defined]
    except plumbing.ClusterError as exc:
        return Status(409, {"detail": str(exc)})
    return Status(201, {"token": token, "expires_at": row.expires_at.isoformat()})


@router.post("/upgrade", response={202: UpgradeOut, 409: Problem})
def upgrade(request: HttpRequest):
    """Upgrade cluster: Cluster Central first, then each member in sequence."""
    require_administrator(request)
    try:
        started = rolling.cluster_upgrade_start(user=request.auth)  # type: ignore[attr-defined]
    except plumbing.ClusterError as exc:
        return Status(409, {"detail": str(exc)})
    return Status(202, selectors.upgrade_dict(started))


@router.delete("/members/{node}", response={204: None, 404: Problem, 409: Problem})
def member_remove(request: HttpRequest, node: str):
    """Remove a member: Central forgets it (its secret, its latest report); the node runs on
    alone until it joins again with a new token. Its name is free for a new join."""
    require_administrator(request)
    try:
        services.member_remove(node=node, user=request.auth)  # type: ignore[attr-defined]
    except plumbing.NotAMember as exc:
        return Status(404, {"detail": str(exc)})
    except plumbing.ClusterError as exc:
        return Status(409, {"detail": str(exc)})
    return Status(204, None)
