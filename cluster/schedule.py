"""Upgrade the cluster at a time (issue 18): the rolling upgrade as a kind of scheduled install.

upgrades.schedule owns the schedule: one pending at a time (a local install or this), the claim
by beat, move, cancel, the refusal with its event and notice, and the settling of a claim a dead
worker left. This module tells it, for the "rolling_upgrade" kind, what the cluster would be
upgraded to now, starts it at the due moment through :func:`cluster.rolling.cluster_upgrade_start`
(whose own checks run then: Central's role, every member reachable, Central's preflight through
its install) and links the ClusterUpgrade started (``ScheduledRollingUpgrade``).
``ClusterConfig.ready`` registers it, as it registers the rolling upgrade's job kind, so the
upgrades app never imports this one.
"""

from __future__ import annotations

from django.db.models import Q

from cluster import rolling
from cluster.models import ClusterMember, ClusterUpgrade, ScheduledRollingUpgrade, UpgradeState
from cluster.plumbing import CENTRAL, ClusterError, cluster_role, local_firmware
from upgrades.models import ScheduledInstall
from upgrades.schedule import ScheduleKind, ScheduleRefused, register_kind

ROLLING_UPGRADE = "rolling_upgrade"


def rolling_schedulable() -> bool:
    """The Cluster page offers "Upgrade the cluster at" on Cluster Central with members only."""
    return cluster_role() == CENTRAL and ClusterMember.objects.exists()


def _version() -> str:
    """The firmware the rolling upgrade would install now, or why there is nothing to do."""
    if cluster_role() != CENTRAL:
        raise ScheduleRefused("Only Cluster Central upgrades the cluster.")
    members = list(ClusterMember.objects.all())
    if not members:
        raise ScheduleRefused(
            "No member has joined this Cluster Central: schedule the install of this appliance "
            "under Updates & Licensing > Install instead."
        )
    if ClusterUpgrade.objects.filter(state=UpgradeState.RUNNING).exists():
        raise ScheduleRefused("A cluster upgrade is running: schedule the next one after it.")
    version = rolling.cluster_target_version()
    if not version:
        raise ScheduleRefused(
            "No firmware is ready on Cluster Central: download it under Updates & Licensing first."
        )
    if all(v == version for v in (local_firmware(), *(m.firmware_version for m in members))):
        raise ScheduleRefused(f"Every node already runs firmware {version}: nothing to upgrade.")
    return version


def _attach(schedule: ScheduledInstall) -> ScheduledRollingUpgrade:
    return ScheduledRollingUpgrade.objects.create(schedule=schedule)


def _link(schedule: ScheduledInstall, upgrade: ClusterUpgrade) -> None:
    ScheduledRollingUpgrade.objects.filter(schedule=schedule, upgrade__isnull=True).update(
        upgrade=upgrade
    )


def _start(due: ScheduledInstall) -> dict[str, object]:
    """Start the rolling upgrade now. Any refusal of its own checks, or a stop at its first
    step (Central's preflight refused its install before any member was asked), means nothing
    was installed anywhere: ScheduleRefused with the reason."""
    target = rolling.cluster_target_version()
    if target != due.version:
        raise ScheduleRefused(
            f"the cluster would be upgraded to {target or 'nothing'} now, not to the scheduled "
            f"{due.version}: schedule it again"
        )
    try:
        upgrade = rolling.cluster_upgrade_start(user=due.requested_by, scheduled=True)
    except ClusterError as exc:
        raise ScheduleRefused(str(exc)) from exc
    _link(due, upgrade)
    if upgrade.state == UpgradeState.STOPPED:
        # Stopped within its start: Central's step failed before a run existed, or a member
        # step failed before its request was sent. Nothing was installed on any node.
        raise ScheduleRefused(upgrade.error)
    return {"cluster_upgrade": upgrade.pk}


def _settle(schedule: ScheduledInstall) -> bool:
    """Link the cluster upgrade a dead worker started after the claim, if any."""
    upgrade = (
        ClusterUpgrade.objects.filter(created_at__gte=schedule.changed_at)
        .order_by("created_at", "id")
        .first()
    )
    if upgrade is None:
        return False
    _link(schedule, upgrade)
    return True


def register_schedule_kind() -> None:
    """The rolling upgrade as a kind of scheduled install (ClusterConfig.ready)."""
    register_kind(
        ScheduleKind(
            name=ROLLING_UPGRADE,
            noun="rolling upgrade",
            title="Rolling upgrade of the cluster to {version}",
            page="cluster:index",
            version=_version,
            start=_start,
            settle=_settle,
            attach=_attach,
            members=Q(rolling_upgrade__isnull=False),
            linked=Q(rolling_upgrade__upgrade__isnull=False),
        )
    )
