"""Reads of the Cluster page and GET /api/v1/cluster: one shape for both."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from appliance.firmware.bundle import version_tuple
from cluster import plumbing, rolling
from cluster.models import CentralLink, ClusterMember, ClusterUpgrade, NodeStep, UpgradeState


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _sort_key(version: str) -> tuple[int, ...]:
    try:
        return version_tuple(version)
    except ValueError:
        return ()


def member_dict(member: ClusterMember) -> dict[str, Any]:
    """A member row: firmware, health, last seen, reachability, install in progress."""
    silence = timedelta(
        seconds=settings.CLUSTER_REPORT_SECONDS * settings.CLUSTER_UNREACHABLE_REPORTS
    )
    reachable = member.reachable and (
        member.last_seen is not None and timezone.now() - member.last_seen <= silence
    )
    return {
        "node": member.node,
        "hostname": member.hostname,
        "firmware_version": member.firmware_version,
        "healthy": member.healthy,
        "health": member.health,
        "reachable": reachable,
        "last_seen": _iso(member.last_seen),
        "last_seen_at": member.last_seen,
        "joined_at": _iso(member.joined_at),
        "install_running": member.install_running,
        "install": member.install,
    }


def member_for_removal(node: str) -> dict[str, Any] | None:
    """The member the "Remove member" confirmation is about (None when there is none), and
    whether a running cluster upgrade still has it ahead (it would stop there)."""
    member = ClusterMember.objects.filter(node=node).first()
    if member is None:
        return None
    upgrade = running_upgrade()
    ahead = False
    if upgrade is not None and node in upgrade.order:
        step = upgrade.results.get(node, {}).get("state")
        ahead = step not in (NodeStep.DONE, NodeStep.SKIPPED, NodeStep.FAILED)
    return {**member_dict(member), "in_running_upgrade": ahead}


def upgrade_dict(upgrade: ClusterUpgrade | None) -> dict[str, Any] | None:
    if upgrade is None:
        return None
    return {
        "id": upgrade.pk,
        "version": upgrade.version,
        "state": upgrade.state,
        "state_label": upgrade.get_state_display(),
        "current_node": upgrade.current_node if upgrade.is_running else "",
        "started_by": upgrade.started_by,
        "created_at": _iso(upgrade.created_at),
        "finished_at": _iso(upgrade.finished_at),
        "error": upgrade.error,
        "stopped_node": upgrade.stopped_node,
        "steps": upgrade.steps(),
    }


def latest_upgrade() -> ClusterUpgrade | None:
    return ClusterUpgrade.objects.first()


def running_upgrade() -> ClusterUpgrade | None:
    return ClusterUpgrade.objects.filter(state=UpgradeState.RUNNING).first()


def versions_notice(versions: list[str]) -> str:
    """ "2 of 3 nodes run 2.8.1.0" when the nodes run different firmware, else ""."""
    known = [v for v in versions if v]
    counts = Counter(known)
    if len(counts) <= 1:
        return ""
    newest = max(counts, key=_sort_key)
    return (
        f"{counts[newest]} of {len(versions)} nodes run {newest}; the others run "
        f"{', '.join(sorted((v for v in counts if v != newest), key=_sort_key))}. Mixed versions "
        "are supported: upgrade the members when convenient (Cluster Central first)."
    )


def link_dict(link: CentralLink | None) -> dict[str, Any] | None:
    if link is None:
        return None
    return {
        "central": link.central or settings.CLUSTER_CENTRAL,
        "state": link.state,
        "state_label": link.get_state_display(),
        "error": link.error,
        "joined_at": _iso(link.joined_at),
        "central_firmware": link.central_firmware,
        "central_seen_at": _iso(link.central_seen_at),
        "last_report_at": _iso(link.last_report_at),
        "upgrade_id": link.upgrade_id,
        "upgrade_run_id": link.upgrade_run_id,
        "upgrade_error": link.upgrade_error,
    }


def cluster_overview() -> dict[str, Any]:
    """Everything the Cluster page and GET /api/v1/cluster show, for this node's role."""
    role = plumbing.cluster_role()
    firmware = plumbing.local_firmware()
    overview: dict[str, Any] = {
        "role": role,
        "node": settings.NODE_NAME,
        "firmware_version": firmware,
        "central": settings.NODE_NAME if role == "central" else settings.CLUSTER_CENTRAL,
        "members": [],
        "versions_notice": "",
        "upgrade": None,
        "link": None,
        "target_version": None,
    }
    if role == "central":
        members = [member_dict(m) for m in ClusterMember.objects.order_by("node")]
        overview["members"] = members
        overview["versions_notice"] = versions_notice(
            [firmware, *[m["firmware_version"] for m in members]]
        )
        overview["upgrade"] = upgrade_dict(latest_upgrade())
        try:
            target = rolling.cluster_target_version()
        except Exception:  # the page must render even when the update tables cannot say
            target = None
        nodes = [firmware, *[m["firmware_version"] for m in members]]
        if target is not None and all(version == target for version in nodes):
            overview["all_on"] = target  # nothing to upgrade: say so, offer no button
        else:
            overview["target_version"] = target
    elif role == "member":
        overview["link"] = link_dict(CentralLink.objects.filter(pk=1).first())
    return overview
