"""Cluster: Central's members, join tokens and rolling upgrades; a member's link to Central.

Each node has its own database, so a row lives on the node that owns the fact: Central keeps
``ClusterMember``, ``JoinToken`` and ``ClusterUpgrade``; a member keeps one ``CentralLink`` (what
it knows of Central). The nodes exchange only Celery messages (JSON) on each other's queues.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class JoinToken(models.Model):
    """A single-use invitation to join this Cluster Central.

    The token is shown once, when it is created, and not kept: ``token_hash`` (its SHA-256) is
    how a join request names it, ``key`` (an HMAC of it, ``cluster.signing.join_key``) signs the
    join request and Central's answer and encrypts the member secret in that answer. A token
    created before messages were signed has no key and cannot be used. It expires after 24
    hours and is spent by the first member that joins with it (a conditional update on
    ``used_at``, so two members racing with one token cannot both join).
    """

    token_hash = models.CharField(max_length=64, unique=True)
    key = models.CharField(max_length=64, blank=True)
    created_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_by = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return f"Join token {self.pk} ({'used' if self.used_at else 'unused'})"

    @property
    def is_expired(self) -> bool:
        return timezone.now() >= self.expires_at


class ClusterMember(models.Model):
    """A member as Cluster Central knows it, from the member's latest report.

    ``secret_hash`` is the SHA-256 of the secret Central gave the member when it joined, and the
    key of every message between Central and the member (``cluster.signing.member_key``): a
    node that never joined cannot pose as a member, nor anyone writing to the broker as
    Central. A join never replaces it: the name stays taken until an administrator removes
    the member.
    ``events_cursor`` is the highest event id of the member already stored here: a batch sent
    twice (a report retried after a lost answer) is stored once.
    """

    node = models.CharField(max_length=64, unique=True)
    secret_hash = models.CharField(max_length=64)
    hostname = models.CharField(max_length=255, blank=True)
    firmware_version = models.CharField(max_length=32, blank=True)
    healthy = models.BooleanField(default=False)
    health = models.JSONField(default=dict, blank=True)
    reachable = models.BooleanField(default=True)
    joined_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(null=True, blank=True)
    reports = models.PositiveIntegerField(default=0)
    install = models.JSONField(default=dict, blank=True)
    upgrade_answer = models.JSONField(default=dict, blank=True)
    events_cursor = models.BigIntegerField(default=0)

    class Meta:
        ordering = ("node",)

    def __str__(self) -> str:
        return f"Cluster member {self.node}"

    @property
    def install_running(self) -> bool:
        return self.install.get("state") in ("queued", "running", "rolling_back")


class JoinState(models.TextChoices):
    """A member's join: not_joined -> pending -> joined | refused; refused -> pending (retry);
    joined -> not_joined (Cluster Central removed the member); joined -> pending (re-join)."""

    NOT_JOINED = "not_joined", "Not joined"
    PENDING = "pending", "Waiting for Cluster Central"
    JOINED = "joined", "Joined"
    REFUSED = "refused", "Refused"


class CentralLink(models.Model):
    """A member's knowledge of its Cluster Central (one row, pk 1).

    ``central_firmware`` is what Central last said it runs (it answers every report): the
    preflight refuses firmware newer than that. ``events_acked`` is the highest local event id
    Central confirmed it stored; events above it are sent (again) with the next report.
    ``upgrade_*`` is this member's part in Central's current rolling upgrade. ``secret`` is
    what Central gave this member at its join (the key of their messages derives from it);
    ``join_key`` is the key of a join request still waiting for its answer (derived from the
    token, which is not kept), blank otherwise.
    """

    central = models.CharField(max_length=64, blank=True)
    state = models.CharField(max_length=16, choices=JoinState.choices, default=JoinState.NOT_JOINED)
    secret = models.CharField(max_length=100, blank=True)
    join_key = models.CharField(max_length=64, blank=True)
    error = models.CharField(max_length=500, blank=True)
    requested_at = models.DateTimeField(null=True, blank=True)
    joined_at = models.DateTimeField(null=True, blank=True)
    central_firmware = models.CharField(max_length=32, blank=True)
    central_seen_at = models.DateTimeField(null=True, blank=True)
    events_acked = models.BigIntegerField(default=0)
    last_report_at = models.DateTimeField(null=True, blank=True)
    upgrade_id = models.BigIntegerField(null=True, blank=True)
    upgrade_version = models.CharField(max_length=32, blank=True)
    upgrade_run_id = models.BigIntegerField(null=True, blank=True)
    upgrade_error = models.CharField(max_length=1000, blank=True)

    def __str__(self) -> str:
        return f"Link to Cluster Central {self.central or '?'} ({self.state})"


class UpgradeState(models.TextChoices):
    """A rolling upgrade. running -> succeeded | stopped (at the first failure); both final."""

    RUNNING = "running", "Upgrading"
    SUCCEEDED = "succeeded", "Complete"
    STOPPED = "stopped", "Stopped"


class NodeStep(models.TextChoices):
    """One node's part of a rolling upgrade::

    pending -> requested (Central sent node_install_start / started its own install)
            -> installing (the node's install run is active) -> done | failed
    pending -> skipped (the node already runs the version)
    """

    PENDING = "pending", "Waiting"
    REQUESTED = "requested", "Requested"
    INSTALLING = "installing", "Installing"
    DONE = "done", "Upgraded"
    SKIPPED = "skipped", "Already on the version"
    FAILED = "failed", "Failed"


class ClusterUpgrade(models.Model):
    """ "Upgrade cluster": Central first, then each member in ``order``, one at a time.

    ``results`` maps each node to its step (``state``, ``run_id``, ``error``, times). It is
    advanced only by ``cluster.rolling.cluster_upgrade_advance`` (called when a member's report
    arrives and from beat), by a conditional update on ``revision``: two advances racing
    cannot both send a member its install. At most one upgrade is running.
    """

    version = models.CharField(max_length=32)
    state = models.CharField(
        max_length=16, choices=UpgradeState.choices, default=UpgradeState.RUNNING
    )
    order = models.JSONField(default=list)
    current_node = models.CharField(max_length=64, blank=True)
    results = models.JSONField(default=dict)
    revision = models.PositiveIntegerField(default=0)
    started_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    step_started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    stopped_node = models.CharField(max_length=64, blank=True)
    # Its record in the job engine's one table (a driven job: who started it, node i of N,
    # how it ended), moved on in the same transaction as ``results``.
    job = models.OneToOneField(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="cluster_upgrade"
    )

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                fields=("state",),
                condition=Q(state="running"),
                name="clusterupgrade_one_running",
                violation_error_message="A cluster upgrade is already running.",
            ),
        )

    def __str__(self) -> str:
        return f"Cluster upgrade {self.pk} to {self.version} ({self.state})"

    @property
    def is_running(self) -> bool:
        return self.state == UpgradeState.RUNNING

    def steps(self) -> list[dict[str, object]]:
        """The nodes in order with their step, for the page and the API."""
        rows = []
        for node in self.order:
            result = dict(self.results.get(node, {}))
            state = str(result.get("state", NodeStep.PENDING))
            if state == NodeStep.DONE:
                # The last progress seen may be from mid-install: a finished node is at 100%.
                result.update(percent=100.0, phase=None)
            rows.append(
                {
                    "node": node,
                    "state": state,
                    "label": NodeStep(state).label if state in NodeStep.values else state,
                    "current": node == self.current_node and self.is_running,
                    "percent": result.get("percent"),
                    "phase": result.get("phase"),
                    "error": result.get("error", ""),
                    "waiting": result.get("waiting", ""),
                    "run_id": result.get("run_id"),
                    "started_at": result.get("started_at"),
                    "finished_at": result.get("finished_at"),
                }
            )
        return rows


class ScheduledRollingUpgrade(models.Model):
    """A scheduled install (``upgrades.ScheduledInstall``, issue 18) that is a rolling upgrade
    of the cluster rather than an install of Central alone, and the ClusterUpgrade it started.

    The schedule itself (its time, claim, move, cancel, refusal) is the ScheduledInstall row:
    one pending at a time whatever it starts. This row only says what it starts when due
    (``cluster.schedule`` registers that with ``upgrades.schedule``); ``upgrade`` is set by a
    conditional update once the rolling upgrade is started, or by a later beat that finds the
    upgrade a dead worker started after its claim.
    """

    schedule = models.OneToOneField(
        "upgrades.ScheduledInstall", on_delete=models.CASCADE, related_name="rolling_upgrade"
    )
    upgrade = models.ForeignKey(
        ClusterUpgrade, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    def __str__(self) -> str:
        return f"Rolling upgrade scheduled by schedule {self.schedule_id}"


class ReceivedNonce(models.Model):
    """The nonce of a signed message this node accepted (``cluster.signing``), so that a copy
    of it is refused: the unique ``nonce`` decides, by the insert itself. Kept until
    ``expires_at``, when the message would be refused for its age anyway, then deleted."""

    nonce = models.CharField(max_length=32, unique=True)
    sender = models.CharField(max_length=64)
    kind = models.CharField(max_length=32)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"Nonce of a {self.kind} message from {self.sender}"
