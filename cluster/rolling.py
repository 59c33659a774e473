"""The rolling upgrade ("Upgrade cluster"): Cluster Central first, then each member in
sequence, and a member's side of it (Central asks it to install).

Central's ClusterUpgrade is advanced only by :func:`cluster_upgrade_advance` (a member's report,
beat), by a conditional update on its revision, and recorded in the job engine's one table as a
driven job. A member starts nothing twice for one upgrade id.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from cluster import signing
from cluster.models import (
    CentralLink,
    ClusterMember,
    ClusterUpgrade,
    JoinState,
    NodeStep,
    UpgradeState,
)
from cluster.plumbing import (
    CENTRAL,
    INSTALL_FAILED,
    MEMBER,
    ClusterError,
    User,
    central_link,
    cluster_role,
    local_firmware,
    local_install,
    open_from_central,
    report_soon,
    require,
    send,
    version_or_blank,
)
from events.models import Category, Severity
from events.services import event_write, username_of
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import JobState

logger = logging.getLogger(__name__)


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
    link = central_link()
    opened = open_from_central(link, message, kind="node_install_start")
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
        transaction.on_commit(report_soon)
        return link
    level = version_or_blank(central_firmware)
    if level:
        CentralLink.objects.filter(pk=1).update(
            central_firmware=level, central_seen_at=timezone.now()
        )
    run_id, error = _start_local_install(version, user=f"Cluster Central {central}")
    CentralLink.objects.filter(pk=1).update(
        upgrade_id=upgrade_id,
        upgrade_version=version_or_blank(version),
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
    transaction.on_commit(report_soon)
    return central_link()


def _start_local_install(version: str, *, user: str) -> tuple[int | None, str]:
    """Start this node's install of ``version``; (run id, "") or (None, why not)."""
    try:
        from upgrades import install
        from upgrades.selectors import ready_download
    except ImportError:
        return None, "this console has no install engine"
    installed = local_firmware()
    ready = ready_download(installed or None)
    if ready is None and cluster_role() == MEMBER and settings.CLUSTER_CENTRAL_URL:
        # Central downloaded and verified the bundle once: fetch it from there (cluster.bundles).
        from cluster.bundles import member_bundle_fetch

        ready, error = member_bundle_fetch(version, user=user)
        if ready is None:
            return None, error
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


def cluster_upgrade_start(*, user: User, scheduled: bool = False) -> ClusterUpgrade:
    """Central: start "Upgrade cluster" (Central first, then each member in node order).

    Started now (not by its schedule, ``scheduled``), it replaces the install or rolling
    upgrade scheduled for later, as an install started now does.
    """
    require(CENTRAL, "Upgrade cluster")
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
    if not scheduled:
        from upgrades.schedule_kinds import schedule_supersede  # issue 18

        schedule_supersede(
            reason=f"the cluster upgrade to {version} started now instead (upgrade {upgrade.pk})",
            user=user,
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
    send(
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
    try:
        return _advance()
    except _LostRace as lost:
        # Read after the block is rolled back: inside it, after a rollback, no query may run.
        return ClusterUpgrade.objects.filter(pk=lost.upgrade_id).first()


class _LostRace(Exception):
    """Another advance changed the upgrade first; raised out of the transaction to undo ours."""

    def __init__(self, upgrade_id: int) -> None:
        super().__init__(upgrade_id)
        self.upgrade_id = upgrade_id


def _advance() -> ClusterUpgrade | None:
    """One pass of :func:`cluster_upgrade_advance`, in one transaction; _LostRace when the
    conditional update finds that another pass moved the upgrade first."""
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
            raise _LostRace(upgrade.pk)
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
