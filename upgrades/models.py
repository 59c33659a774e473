"""The console's record of firmware updates: feed checks, offers, downloads, the update settings."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from lmi import progress

# The one component update-control knows today (``update-control -d fw``).
FIRMWARE = "fw"


class CheckTrigger(models.TextChoices):
    """Who asked for a feed check."""

    SCHEDULE = "schedule", "Hourly schedule"
    USER = "user", "Check now"
    API = "api", "API"
    CLI = "cli", "update-control"


class UpdateCheck(models.Model):
    """One look at the update feed: when, who asked, and what came of it.

    The newest row is the "last check" the page shows. A failed check keeps the feed's error in
    ``error``, so an unreachable or malformed feed is visible, never a silent nothing.
    """

    checked_at = models.DateTimeField(default=timezone.now)
    trigger = models.CharField(max_length=16, choices=CheckTrigger.choices)
    requested_by = models.CharField(max_length=150, blank=True)
    feed_url = models.CharField(max_length=1000)
    ok = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    offers_listed = models.PositiveIntegerField(default=0)
    newest_available = models.CharField(max_length=32, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ("-checked_at", "-id")

    def __str__(self) -> str:
        return f"Check {self.checked_at:%Y-%m-%d %H:%M} ({'ok' if self.ok else 'failed'})"


class FirmwareOffer(models.Model):
    """A firmware bundle the feed lists (or listed): what it is and where to get it.

    One row per bundle (version and SHA-256); a republished bundle of the same version is a new
    row. ``listed`` says whether the latest successful check still saw it. Whether it may be
    downloaded depends on the installed firmware and is worked out when it is read
    (``upgrades.selectors.offer_eligibility``), because the installed firmware changes.
    """

    version = models.CharField(max_length=32)
    min_version = models.CharField(max_length=32)
    url = models.CharField(max_length=2000)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    release_notes = models.TextField(blank=True)
    listed = models.BooleanField(default=True)
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("-first_seen_at", "-id")
        constraints = (
            models.UniqueConstraint(fields=("version", "sha256"), name="firmwareoffer_bundle"),
        )

    def __str__(self) -> str:
        return f"Firmware {self.version}"


class DownloadState(models.TextChoices):
    """Where a firmware download is. Allowed transitions, each by a conditional update::

        queued    -> running     an executor (the worker's task or update-control) claimed it
        running   -> running     another executor took over after the holder's lease lapsed
                                 (its worker was killed): it resumes the part file with Range
        running   -> verifying   every byte is in; the file's SHA-256 and the bundle's
                                 signature, payload digest and paths are being checked
        verifying -> ready       the bundle passed every check and sits in var/spool/updates
        queued, running, verifying -> failed     an error that retrying did not cure, a
                                 rejected bundle (file deleted), or no space left
        queued, running, verifying -> cancelled  an administrator cancelled (part file deleted)

    ready, failed and cancelled are final: a new attempt is a new row (and resumes a kept part
    file of the same bundle).
    """

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Downloading"
    VERIFYING = "verifying", "Verifying"
    READY = "ready", "Ready to install"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATES = (DownloadState.QUEUED, DownloadState.RUNNING, DownloadState.VERIFYING)
FINAL_STATES = (DownloadState.READY, DownloadState.FAILED, DownloadState.CANCELLED)


class DownloadTrigger(models.TextChoices):
    """Why a download was started."""

    USER = "user", "Download button"
    API = "api", "API"
    CLI = "cli", "update-control"
    AUTOMATIC = "automatic", "Automatic firmware downloads"


class Download(models.Model):
    """One attempt to download a firmware bundle into var/spool/updates.

    Created queued with its job (jobs.Job, kind ``download``), whose task is enqueued on commit;
    an executor claims the job (lease and fence are the job engine's) and every write it makes
    here is conditional on still holding that job, so a redelivered task or an executor that
    stalled past its lease never writes over another's progress. The partial unique index allows
    one active download per component, so two clicks, the API and update-control can never run
    two at once. The bundle's identity (URL,
    size, SHA-256) is copied from the offer: a resumed transfer must fetch these exact bytes.
    """

    component = models.CharField(max_length=8, default=FIRMWARE)
    offer = models.ForeignKey(FirmwareOffer, null=True, on_delete=models.SET_NULL)
    version = models.CharField(max_length=32)
    url = models.CharField(max_length=2000)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    state = models.CharField(
        max_length=16, choices=DownloadState.choices, default=DownloadState.QUEUED
    )
    trigger = models.CharField(max_length=16, choices=DownloadTrigger.choices)
    requested_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Progress, written a few times per second at most.
    bytes_done = models.BigIntegerField(default=0)
    verified_bytes = models.BigIntegerField(default=0)
    rate = models.FloatField(default=0.0)  # bytes per second, smoothed
    progress_at = models.DateTimeField(null=True, blank=True)
    # The job that runs it: who holds it, its lease and fence, its restarts after a dead worker.
    job = models.OneToOneField(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="download"
    )
    # How many times a transfer started (1 + resumes after cuts or a killed worker), and how
    # many of those went on from a kept part file instead of byte 0.
    transfers = models.PositiveIntegerField(default=0)
    resumes = models.PositiveIntegerField(default=0)
    # Failed because the bundle itself was refused (bad digest, signature, paths): an automatic
    # download does not fetch the same bundle again.
    rejected = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    file_name = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                fields=("component",),
                condition=Q(state__in=ACTIVE_STATES),
                name="download_one_active_per_component",
                violation_error_message="A firmware download is already in progress.",
            ),
        )
        indexes = (models.Index(fields=("component", "state"), name="download_component_state"),)

    def __str__(self) -> str:
        return f"Download {self.pk} of {self.version} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def percent(self) -> float:
        return progress.percent(
            self.bytes_done, self.size, finished=self.state == DownloadState.READY
        )

    @property
    def verify_percent(self) -> float:
        return progress.percent(self.verified_bytes, self.size)

    @property
    def elapsed_seconds(self) -> float | None:
        """From the first claim to the end (or to now while it runs)."""
        return progress.seconds_between(self.started_at, self.finished_at)

    @property
    def eta_seconds(self) -> int | None:
        """Time left at the current rate; None while unknown (no rate yet, or not downloading)."""
        if self.state != DownloadState.RUNNING:
            return None
        return progress.seconds_left(self.size, self.bytes_done, self.rate)


class UpdateSettings(models.Model):
    """The update settings of the console (one row, pk=1): automatic firmware downloads."""

    automatic_downloads = models.BooleanField(default=False)
    changed_at = models.DateTimeField(null=True, blank=True)
    changed_by = models.CharField(max_length=150, blank=True)

    def __str__(self) -> str:
        return f"Automatic downloads {'on' if self.automatic_downloads else 'off'}"


class InstallState(models.TextChoices):
    """Where a firmware install run is. Allowed transitions, each by a conditional update::

        queued       -> running       phase 1's task claimed the run
        queued, running -> aborted    abort requested (or a failure) in phases 1-2: nothing the
                                      running appliance uses was touched; staging is discarded
        running      -> rolling_back  a failure, a health check that did not pass, or too many
                                      phase starts (a crash loop) in phases 3-9
        rolling_back -> rolled_back   the previous slot, firmware level, message store and
                                      configuration are back exactly; maintenance is off
        rolling_back -> failed        the rollback itself could not finish: needs attention
        running      -> succeeded     phase 10 (the commit) completed

    succeeded, failed, rolled_back and aborted are final. A failure inside phase 10 is retried,
    never rolled back: the run stays running until the commit completes.
    """

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Installing"
    ROLLING_BACK = "rolling_back", "Rolling back"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed (needs attention)"
    ROLLED_BACK = "rolled_back", "Rolled back"
    ABORTED = "aborted", "Aborted"


INSTALL_ACTIVE_STATES = (InstallState.QUEUED, InstallState.RUNNING, InstallState.ROLLING_BACK)
INSTALL_FINAL_STATES = (
    InstallState.SUCCEEDED,
    InstallState.FAILED,
    InstallState.ROLLED_BACK,
    InstallState.ABORTED,
)
InstallState.ACTIVE = frozenset(INSTALL_ACTIVE_STATES)  # type: ignore[attr-defined]
InstallState.FINAL = frozenset(INSTALL_FINAL_STATES)  # type: ignore[attr-defined]


class PhaseState(models.TextChoices):
    """Where one phase of an install run is::

    pending -> running -> succeeded | failed
    running -> running        a new executor restarted the phase after the old one died
    pending -> skipped        the run ended (abort, rollback) before the phase was reached
    succeeded, failed, running -> rolled_back   the rollback undid this phase's work
    """

    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Done"
    FAILED = "failed", "Failed"
    ROLLED_BACK = "rolled_back", "Rolled back"
    SKIPPED = "skipped", "Skipped"


class InstallTrigger(models.TextChoices):
    """How an install run was started."""

    CONSOLE = "console", "Console"
    CLI = "cli", "update-control"
    API = "api", "API"
    CLUSTER = "cluster", "Cluster Central"
    SCHEDULE = "schedule", "Scheduled install"


# The guide's Table 1 summaries, by phase number.
PHASE_NAMES: dict[int, str] = {
    1: "Download",
    2: "Install new operating system",
    3: "Service shutdown",
    4: "Prepare the message store database for migration (backup)",
    5: "Automatic backup of the current configuration",
    6: "Restart onto the new system",
    7: "Migrate the message store",
    8: "Convert the configuration",
    9: "Clean up temporary files",
    10: "Restart services",
}
PHASE_COUNT = len(PHASE_NAMES)
# Return to the previous firmware (issue 18): the same ten steps the other way round, named
# for what each does on the way back (upgrades.return_phases).
RETURN_PHASE_NAMES: dict[int, str] = {
    1: "Check the way back",
    2: "Convert the message store back while mail flows",
    3: "Service shutdown",
    4: "Keep the message store for the rollback (backup)",
    5: "Automatic backup of the current configuration",
    6: "Restart onto the previous system",
    7: "Convert the message store back",
    8: "Put back the previous configuration",
    9: "Clean up temporary files",
    10: "Restart services",
}


class InstallDirection(models.TextChoices):
    """Which way a run goes: the upgrade to a downloaded firmware, or the return to the
    firmware an earlier successful upgrade replaced (within its retention period)."""

    UPGRADE = "upgrade", "Upgrade"
    RETURN = "return", "Return to the previous firmware"


class InstallRun(models.Model):
    """One firmware install: the persisted state machine of the ten phases of Table 1.

    Created queued (with its ten phase rows) with its job (jobs.Job, kind ``install``), whose
    task is enqueued on commit. One executor at a time holds the job and runs the phases one
    after the other; every write it makes to the run is conditional on still holding the job
    (its fence), so a redelivered task or an executor that stalled past its lease changes
    nothing, and one whose worker died is resumed in its phase by the reconciler. The partial
    unique index allows one active run, so the console, update-control and the API can
    never start two. ``attempts`` counts phase starts: past a limit (a crash loop) the run is
    rolled back instead of tried again.
    """

    download = models.ForeignKey(Download, on_delete=models.PROTECT, related_name="install_runs")
    component = models.CharField(max_length=8, default=FIRMWARE)
    version = models.CharField(max_length=32)
    from_version = models.CharField(max_length=32, blank=True)
    requested_by = models.CharField(max_length=150, blank=True)
    trigger = models.CharField(
        max_length=16, choices=InstallTrigger.choices, default=InstallTrigger.CONSOLE
    )
    state = models.CharField(
        max_length=16, choices=InstallState.choices, default=InstallState.QUEUED
    )
    phase = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    abort_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    # The job that runs it: who holds it, its lease and fence, its restarts after a dead worker.
    job = models.OneToOneField(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="install_run"
    )
    attempts = models.PositiveIntegerField(default=0)
    downtime_started_at = models.DateTimeField(null=True, blank=True)
    downtime_ended_at = models.DateTimeField(null=True, blank=True)
    messages_before = models.BigIntegerField(null=True, blank=True)
    messages_after = models.BigIntegerField(null=True, blank=True)
    log_name = models.CharField(max_length=200, blank=True)
    details = models.JSONField(default=dict, blank=True)
    # A return's ``version`` is the firmware it returns to and ``from_version`` the one it
    # leaves; its ``download`` is the upgrade's, and ``details["returns_run"]`` that upgrade.
    direction = models.CharField(
        max_length=8, choices=InstallDirection.choices, default=InstallDirection.UPGRADE
    )

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                fields=("component",),
                condition=Q(state__in=INSTALL_ACTIVE_STATES),
                name="installrun_one_active",
                violation_error_message="A firmware install is already in progress.",
            ),
        )

    def __str__(self) -> str:
        return f"Install {self.pk} of {self.version} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in INSTALL_ACTIVE_STATES

    @property
    def is_return(self) -> bool:
        return self.direction == InstallDirection.RETURN

    @property
    def phase_names(self) -> dict[int, str]:
        return RETURN_PHASE_NAMES if self.is_return else PHASE_NAMES

    @property
    def label(self) -> str:
        """What the run is, for events and logs: "Install of firmware X" or "Return to ..."."""
        return f"{'Return to' if self.is_return else 'Install of'} firmware {self.version}"

    @property
    def short_label(self) -> str:
        """The same without "firmware" (the phase events: "Install of 2.8.1.0: phase 3 ...")."""
        return f"{'Return to' if self.is_return else 'Install of'} {self.version}"

    @property
    def can_abort(self) -> bool:
        """Abort is allowed while nothing the running appliance uses was touched (1-2)."""
        return self.state in (InstallState.QUEUED, InstallState.RUNNING) and self.phase <= 2

    @property
    def elapsed_seconds(self) -> float | None:
        return progress.seconds_between(self.started_at, self.finished_at)

    @property
    def downtime_seconds(self) -> float | None:
        return progress.seconds_between(self.downtime_started_at, self.downtime_ended_at)


class InstallPhase(models.Model):
    """One phase of an install run: its state, times and progress within the phase."""

    run = models.ForeignKey(InstallRun, on_delete=models.CASCADE, related_name="phases")
    number = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=100)
    state = models.CharField(max_length=16, choices=PhaseState.choices, default=PhaseState.PENDING)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    done = models.BigIntegerField(default=0)
    total = models.BigIntegerField(default=0)
    unit = models.CharField(max_length=16, default="steps")
    message = models.CharField(max_length=300, blank=True)
    counts = models.JSONField(default=dict, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ("run", "number")
        constraints = (
            models.UniqueConstraint(fields=("run", "number"), name="installphase_run_number"),
        )

    def __str__(self) -> str:
        return f"Phase {self.number} of install {self.run_id} ({self.state})"

    @property
    def percent(self) -> float:
        return progress.percent(self.done, self.total, finished=self.state == PhaseState.SUCCEEDED)

    @property
    def elapsed_seconds(self) -> float | None:
        return progress.seconds_between(self.started_at, self.finished_at)


class ScheduleState(models.TextChoices):
    """Where a scheduled install is (issue 18). Allowed transitions, each by a conditional update::

        pending -> pending     moved to another time by an administrator
        pending -> started     beat found it due and claimed it; ``run`` is the install it started
        started -> refused     the install could not start at that moment (a preflight check
                               failed, nothing to install, another install running): nothing was
                               installed, ``reason`` says why
        pending -> cancelled   an administrator cancelled it

    started, refused and cancelled are final: a new time is a new row.
    """

    PENDING = "pending", "Pending"
    STARTED = "started", "Started"
    CANCELLED = "cancelled", "Cancelled"
    REFUSED = "refused", "Refused"


class ScheduledInstall(models.Model):
    """An install of the downloaded firmware set for a later moment (Install at).

    At most one is pending (the partial unique index): two administrators cannot leave two
    installs waiting. Beat's ``upgrades.tasks.install_schedule_due`` claims it once ``at`` has
    come (a conditional update, so two beats never start two installs) and starts the install
    through the same service as Install now, preflight included.
    """

    component = models.CharField(max_length=8, default=FIRMWARE)
    version = models.CharField(max_length=32)
    at = models.DateTimeField()
    requested_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    state = models.CharField(
        max_length=16, choices=ScheduleState.choices, default=ScheduleState.PENDING
    )
    reason = models.TextField(blank=True)
    changed_at = models.DateTimeField(null=True, blank=True)
    changed_by = models.CharField(max_length=150, blank=True)
    run = models.ForeignKey(
        InstallRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                fields=("component",),
                condition=Q(state="pending"),
                name="scheduledinstall_one_pending",
                violation_error_message="An install is already scheduled.",
            ),
        )

    def __str__(self) -> str:
        return f"Install of {self.version} at {self.at:%Y-%m-%d %H:%M} ({self.state})"
