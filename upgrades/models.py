"""The console's record of firmware updates: feed checks, offers, downloads, the update settings."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

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

    Created queued before its task is enqueued (on commit); an executor claims it by a
    conditional update and holds a lease (``lease_owner``, renewed in ``heartbeat_at``) while it
    writes the spool. The partial unique index allows one active download per component, so two
    clicks, the API and update-control can never run two at once. The bundle's identity (URL,
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
    # The executor holding the download and when it last said it is alive.
    lease_owner = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
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
        if self.state == DownloadState.READY:
            return 100.0
        if self.size <= 0:
            return 0.0
        return min(100.0, 100.0 * self.bytes_done / self.size)

    @property
    def verify_percent(self) -> float:
        if self.size <= 0:
            return 0.0
        return min(100.0, 100.0 * self.verified_bytes / self.size)

    @property
    def elapsed_seconds(self) -> float | None:
        """From the first claim to the end (or to now while it runs)."""
        if self.started_at is None:
            return None
        end = self.finished_at or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def eta_seconds(self) -> int | None:
        """Time left at the current rate; None while unknown (no rate yet, or not downloading)."""
        if self.state != DownloadState.RUNNING or self.rate <= 0:
            return None
        return max(0, round((self.size - self.bytes_done) / self.rate))


class UpdateSettings(models.Model):
    """The update settings of the console (one row, pk=1): automatic firmware downloads."""

    automatic_downloads = models.BooleanField(default=False)
    changed_at = models.DateTimeField(null=True, blank=True)
    changed_by = models.CharField(max_length=150, blank=True)

    def __str__(self) -> str:
        return f"Automatic downloads {'on' if self.automatic_downloads else 'off'}"
