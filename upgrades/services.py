"""Writes of Updates & Licensing: feed checks, firmware downloads, the update settings, licenses.

The download is the heart of it (the guide's phase 1). A Download row is created queued and
its task enqueued on commit; the same ``download_execute`` runs in the worker's task and in
``update-control -d fw``. It claims the row by a conditional update and holds a lease (renewed
with every progress write, at most a few times per second), so a second executor (a redelivered
task, a recovery after a killed worker, a duplicate) waits for the lease to lapse and takes
over, or sees the holder alive and leaves. The bytes stream into var/spool/updates as a part
file, hashed as they arrive; a later transfer of the same bundle resumes the part with an HTTP
Range request. Only after the file's SHA-256 matches the feed and ``verify_bundle`` accepts the
signature, the payload digest and every path is the bundle renamed into place and called ready.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from appliance.firmware import bundle as appliance_bundle
from appliance.firmware import feed as appliance_feed
from appliance.firmware import license as appliance_license
from appliance.firmware import spool
from appliance.system.errors import ApplianceError
from events.models import Category, Severity
from events.services import User, event_write, username_of
from jobs import leases
from lmi import celery as lmi_celery
from lmi.progress import RateMeter
from upgrades import http, selectors
from upgrades.hashing import StreamHasher
from upgrades.models import (
    ACTIVE_STATES,
    FIRMWARE,
    CheckTrigger,
    Download,
    DownloadState,
    DownloadTrigger,
    FirmwareOffer,
    UpdateCheck,
    UpdateSettings,
)

logger = logging.getLogger(__name__)


# An executor renews its lease with every progress write (PROGRESS_INTERVAL); one silent for
# LEASE_SECONDS is gone (its worker was killed) and another may take the download over. The
# lease must outlast the longest silence of a live executor: a read blocked for http.TIMEOUT.
PROGRESS_INTERVAL = 0.5
LEASE_SECONDS = 30.0
# Consecutive failed transfers (without a byte of progress) before the download gives up, and
# the backoff between them: 1, 2, 4, 8, 16 s (capped).
MAX_RETRIES = 5
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
CHUNK = 1024 * 1024
DOWNLOAD_TASK = "upgrades.tasks.download_run"
RATE_WINDOW = 5.0  # the shown rate's time constant (lmi.progress.RateMeter), in seconds
HEADER_PROBE_BYTES = 4096  # try the signed header once this much is in
# A queued download nobody claimed for this long lost its task (the beat check re-enqueues it).
QUEUED_STALE_AFTER = timedelta(minutes=2)
CHECKS_KEPT = 200


# --- Errors a caller shows to a person -------------------------------------------------------


class UpdateError(Exception):
    """A refused request; the message says why and what to do."""


class NothingToDownload(UpdateError):
    """No newer firmware that applies to this appliance is listed."""


class AlreadyReady(UpdateError):
    """The firmware is already downloaded and verified."""


class NotDownloadable(UpdateError):
    """The firmware asked for does not apply to this appliance, or is not listed."""


class NotEntitled(UpdateError):
    """No valid, unexpired license: downloads are refused."""


class DownloadInProgress(UpdateError):
    """One download at a time."""


class InsufficientSpace(UpdateError):
    """The spool's disk cannot hold the bundle (and the margin)."""


class NoActiveDownload(UpdateError):
    """Cancel with nothing to cancel."""


# --- Internal outcomes of a download ---------------------------------------------------------


class _Rejected(Exception):
    """The bundle itself is bad: delete it, fail, and say why."""


class _Failed(Exception):
    """The download cannot go on (retries exhausted, no space, a permanent HTTP error)."""


class _Cancelled(Exception):
    """Cancelled meanwhile: delete the part file and stop."""


class _LeaseLost(Exception):
    """Another executor holds the download now: stop touching the spool."""


def _event(
    message: str, *, severity: int = Severity.INFO, user: User | None = None, **details: Any
) -> None:
    event_write(
        category=Category.UPDATE, message=message, severity=severity, user=user, details=details
    )


# --- The update feed -------------------------------------------------------------------------


def feed_location(configured: str | None = None) -> tuple[str, str]:
    """The feed document (URL or path) and the base its relative bundle names resolve against.

    UPDATE_FEED_URL names an http(s) URL (of feed.json itself when it ends in .json, else of
    the directory holding it) or a local directory holding feed.json.
    """
    where = (configured if configured is not None else settings.UPDATE_FEED_URL).strip()
    if not where:
        raise UpdateError("No update feed is configured (LMI_UPDATE_FEED_URL).")
    if http.is_http(where):
        document = (
            where if urlsplit(where).path.endswith(".json") else where.rstrip("/") + "/feed.json"
        )
        return document, document
    path = Path(where)
    if path.suffix == ".json" and not path.is_dir():
        return str(path), str(path.parent)
    return str(path / "feed.json"), str(path)


def update_check(*, trigger: CheckTrigger | str, user: User | None = None) -> UpdateCheck:
    """Ask the feed what firmware exists; record the offers and the outcome.

    A failed check (feed unreachable, malformed) is recorded with its error and written as an
    event, never a silent nothing. With automatic downloads on, a newer firmware found here
    starts downloading by itself.
    """
    started = time.monotonic()
    username = username_of(user)
    try:
        document, base = feed_location()
    except UpdateError as exc:
        return _check_failed(trigger, username, "", str(exc), started)
    try:
        data = http.fetch_bytes(document)
        entries = appliance_feed.parse_feed(data, base)
    except http.FetchError as exc:
        return _check_failed(
            trigger, username, document, f"The update feed is unreachable: {exc}", started
        )
    except (appliance_feed.FeedError, ApplianceError, ValueError) as exc:
        return _check_failed(
            trigger, username, document, f"The update feed is malformed: {exc}", started
        )

    now = timezone.now()
    installed = selectors.installed_version()
    seen: list[int] = []
    new_offers: list[FirmwareOffer] = []
    with transaction.atomic():
        for entry in entries:
            offer, created = FirmwareOffer.objects.update_or_create(
                version=entry.version,
                sha256=entry.sha256.lower(),
                defaults={
                    "min_version": entry.min_version,
                    "url": entry.url,
                    "size": entry.size,
                    "release_notes": entry.release_notes or "",
                    "listed": True,
                    "last_seen_at": now,
                },
            )
            seen.append(offer.pk)
            if created:
                new_offers.append(offer)
        FirmwareOffer.objects.filter(listed=True).exclude(pk__in=seen).update(listed=False)
        newest = selectors.newest_downloadable(installed)
        check = UpdateCheck.objects.create(
            checked_at=now,
            trigger=trigger,
            requested_by=username,
            feed_url=document,
            ok=True,
            offers_listed=len(entries),
            newest_available=newest.offer.version if newest else "",
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        for offer in new_offers:
            eligibility = selectors.offer_eligibility(offer.version, offer.min_version, installed)
            if eligibility.downloadable:
                _event(
                    f"Firmware {offer.version} is available",
                    version=offer.version,
                    size=offer.size,
                    release_notes=offer.release_notes[:2000],
                )
        if trigger != CheckTrigger.SCHEDULE:
            found = (
                f"firmware {newest.offer.version} is available" if newest else "no newer firmware"
            )
            _event(
                f"Checked for firmware updates: {found}",
                user=user,
                feed=document,
                offers=len(entries),
            )
    _prune_checks()
    if newest is not None:
        _maybe_download_automatically(newest)
    return check


def _check_failed(
    trigger: CheckTrigger | str, username: str, document: str, error: str, started: float
) -> UpdateCheck:
    check = UpdateCheck.objects.create(
        trigger=trigger,
        requested_by=username,
        feed_url=document,
        ok=False,
        error=error,
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    _event(
        f"Checking for firmware updates failed: {error}",
        severity=Severity.WARNING,
        user=username or None,
        feed=document,
    )
    _prune_checks()
    return check


def _prune_checks() -> None:
    keep = list(UpdateCheck.objects.values_list("pk", flat=True)[:CHECKS_KEPT])
    if len(keep) == CHECKS_KEPT:
        UpdateCheck.objects.exclude(pk__in=keep).delete()


def _maybe_download_automatically(newest: selectors.OfferView) -> None:
    if not selectors.update_settings().automatic_downloads:
        return
    offer = newest.offer
    if selectors.active_download() is not None:
        return
    if selectors.ready_bundle_of(offer.version, offer.sha256) is not None:
        return
    if selectors.was_rejected(offer.url, offer.sha256):
        return  # a bundle that failed verification is not fetched again every hour
    try:
        download_start(user=None, trigger=DownloadTrigger.AUTOMATIC, version=offer.version)
    except (NotEntitled, InsufficientSpace) as exc:
        _event(
            f"Automatic download of firmware {offer.version} did not start: {exc}",
            severity=Severity.WARNING,
            version=offer.version,
        )
    except UpdateError as exc:
        logger.info("automatic download of %s not started: %s", offer.version, exc)


# --- Starting, cancelling, recovering downloads --------------------------------------------


def _space_needed(offer_size: int, version: str, url: str, sha256: str) -> int:
    bundle = spool.bundle_id(version, sha256)
    record = spool.read_record(bundle)
    kept = spool.part_size(bundle) if record and record.same_bundle(url, offer_size, sha256) else 0
    return max(0, offer_size - kept) + spool.FREE_SPACE_MARGIN


def _check_space(size: int, version: str, url: str, sha256: str) -> None:
    needed = _space_needed(size, version, url, sha256)
    free = spool.free_bytes()
    if free < needed:
        raise InsufficientSpace(
            f"Not enough free space in var/spool/updates for firmware {version}: it needs "
            f"{filesizeformat(needed)} (the bundle and a margin of "
            f"{filesizeformat(spool.FREE_SPACE_MARGIN)}), {filesizeformat(free)} is free."
        )


def _require_entitlement() -> None:
    lic = selectors.license_view()
    if not lic.entitled:
        raise NotEntitled(
            "Firmware downloads need a valid license with an unexpired update entitlement: "
            f"{lic.reason or 'no license is installed'}. Upload the license file under "
            "Updates > Updates & Licensing > Licensing."
        )


def download_start(
    *,
    user: User | None,
    trigger: DownloadTrigger | str,
    version: str | None = None,
    enqueue: bool = True,
) -> Download:
    """Create a queued download of ``version`` (default: the newest that applies) and enqueue it.

    With ``enqueue=False`` the caller runs ``download_execute`` itself (update-control -d fw).
    """
    installed = selectors.installed_version()
    if installed is None:
        raise UpdateError("The installed firmware level cannot be read, so no update can apply.")
    if version:
        views = [v for v in selectors.listed_offers(installed) if v.offer.version == version]
        if not views:
            raise NotDownloadable(
                f"The update feed lists no firmware {version}. Check for updates, then try again."
            )
        view = views[0]
        if not view.downloadable:
            raise NotDownloadable(
                f"Firmware {version} cannot be downloaded: it is {view.eligibility.label}."
            )
    else:
        found = selectors.newest_downloadable(installed)
        if found is None:
            raise NothingToDownload(
                f"No newer firmware is available (installed: {installed}). "
                "Check for updates to ask the feed again."
            )
        view = found
    offer = view.offer
    if selectors.ready_bundle_of(offer.version, offer.sha256) is not None:
        raise AlreadyReady(f"Firmware {offer.version} is already downloaded and ready to install.")
    active = selectors.active_download()
    if active is not None:
        raise _in_progress(active)
    _require_entitlement()
    _check_space(offer.size, offer.version, offer.url, offer.sha256)

    username = username_of(user)
    with transaction.atomic():
        try:
            with transaction.atomic():
                download = Download.objects.create(
                    component=FIRMWARE,
                    offer=offer,
                    version=offer.version,
                    url=offer.url,
                    size=offer.size,
                    sha256=offer.sha256.lower(),
                    trigger=trigger,
                    requested_by=username,
                )
        except IntegrityError:
            active = selectors.active_download()
            raise _in_progress(active) from None
        how = "" if trigger != DownloadTrigger.AUTOMATIC else " (automatic firmware downloads)"
        _event(
            f"Download of firmware {offer.version} started{how}",
            user=user,
            download=download.pk,
            version=offer.version,
            size=offer.size,
            url=offer.url,
        )
        if enqueue:
            pk = download.pk
            transaction.on_commit(lambda: _enqueue(pk))
    return download


def _in_progress(active: Download | None) -> DownloadInProgress:
    if active is None:
        return DownloadInProgress("A firmware download is already in progress.")
    return DownloadInProgress(
        f"A firmware download is already in progress: firmware {active.version}, "
        f"{active.percent:.0f}% ({DownloadState(active.state).label.lower()}). "
        "Cancel it first, or wait for it to finish."
    )


def _enqueue(download_id: int) -> None:
    try:
        lmi_celery.enqueue(DOWNLOAD_TASK, download_id)
    except Exception as exc:  # the broker is down: say so instead of leaving it queued
        logger.exception("could not enqueue download %s", download_id)
        _finish(
            download_id,
            DownloadState.FAILED,
            from_states=(DownloadState.QUEUED,),
            error=f"the task queue cannot be reached: {exc}",
        )
        _event(
            f"Download {download_id} could not be queued: the task queue cannot be reached",
            severity=Severity.ERROR,
            download=download_id,
        )


def download_cancel(*, user: User | None, download_id: int | None = None) -> Download:
    """Cancel the active download; the executor (or this, when none is alive) deletes the part."""
    query = Download.objects.filter(component=FIRMWARE, state__in=ACTIVE_STATES)
    if download_id is not None:
        query = query.filter(pk=download_id)
    download = query.first()
    if download is None:
        raise NoActiveDownload("No firmware download is in progress.")
    now = timezone.now()
    updated = Download.objects.filter(pk=download.pk, state__in=ACTIVE_STATES).update(
        state=DownloadState.CANCELLED, finished_at=now, error="Cancelled"
    )
    if not updated:
        download.refresh_from_db()
        raise NoActiveDownload(
            f"The download of firmware {download.version} already ended "
            f"({DownloadState(download.state).label.lower()})."
        )
    download.refresh_from_db()
    if not _executor_alive(download):
        spool.discard_part(spool.bundle_id(download.version, download.sha256))
    _event(
        f"Download of firmware {download.version} cancelled at {download.percent:.0f}%",
        user=user,
        download=download.pk,
        version=download.version,
        bytes_done=download.bytes_done,
    )
    return download


def _executor_alive(download: Download) -> bool:
    return leases.holder_alive(download.lease_owner, download.heartbeat_at, LEASE_SECONDS)


def downloads_recover(*, stale_only: bool) -> list[int]:
    """Enqueue the task again for active downloads whose executor may be gone.

    A worker that starts calls this with ``stale_only=False`` (a worker killed a moment ago still
    looks alive; the task waits for its lease to lapse); the job engine's reconciler, every few
    seconds, with ``True``. A task
    enqueued twice is harmless: the lease lets one executor through.
    """
    now = timezone.now()
    query = Download.objects.filter(state__in=ACTIVE_STATES)
    if stale_only:
        lapsed = now - timedelta(seconds=LEASE_SECONDS)
        query = query.filter(
            Q(state=DownloadState.QUEUED, created_at__lt=now - QUEUED_STALE_AFTER)
            | (~Q(state=DownloadState.QUEUED) & (Q(heartbeat_at__lt=lapsed) | Q(heartbeat_at=None)))
        )
    ids = list(query.values_list("pk", flat=True))
    for pk in ids:
        lmi_celery.enqueue(DOWNLOAD_TASK, pk)
    return ids


def automatic_downloads_set(*, enabled: bool, user: User | None) -> UpdateSettings:
    """Turn automatic firmware downloads on or off (an event either way)."""
    row, _ = UpdateSettings.objects.get_or_create(pk=1)
    if row.automatic_downloads != enabled:
        UpdateSettings.objects.filter(pk=1).update(
            automatic_downloads=enabled, changed_at=timezone.now(), changed_by=username_of(user)
        )
        _event(f"Automatic firmware downloads turned {'on' if enabled else 'off'}", user=user)
        row.refresh_from_db()
        if enabled and (newest := selectors.newest_downloadable()) is not None:
            _maybe_download_automatically(newest)
    return row


def license_install(data: bytes, *, user: User | None) -> Any:
    """Install an uploaded license file; a refused file raises UpdateError with the reason."""
    try:
        installed = appliance_license.install_license(data)
    except (appliance_license.LicenseError, ApplianceError, ValueError) as exc:
        _event(f"A license file was refused: {exc}", severity=Severity.WARNING, user=user)
        raise UpdateError(f"The license file was refused: {exc}") from exc
    _event(
        f"License installed for {installed.customer}: updates until {installed.updates_until}",
        user=user,
        customer=installed.customer,
        serial=installed.serial,
        updates_until=str(installed.updates_until),
    )
    return installed


# --- Running a download ------------------------------------------------------------------------


executor_name = leases.executor_name


ProgressCallback = Callable[[Download], None]


def download_execute(
    download_id: int,
    *,
    executor: str | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> str:
    """Run (or resume) a download to its end; returns the state it left the row in.

    Refuses, returning the current state, when the row is no longer active or another live
    executor holds it.
    """
    executor = executor or executor_name()
    claimed = _claim(download_id, executor)
    if claimed is None:
        state = Download.objects.filter(pk=download_id).values_list("state", flat=True).first()
        return str(state) if state else "missing"
    run = _DownloadRun(claimed, executor, on_progress, should_cancel)
    try:
        return run.execute()
    finally:
        Download.objects.filter(pk=download_id, lease_owner=executor).update(lease_owner="")


def _claim(download_id: int, executor: str) -> Download | None:
    """Take the download's lease by a conditional update, waiting out a lapsed holder.

    Free (no holder), a holder silent for LEASE_SECONDS, or a holder on this host whose process
    is gone (a killed worker): this executor takes it, queued becomes running. Held by a live
    executor (its heartbeat moves while we wait): None.
    """
    deadline = time.monotonic() + LEASE_SECONDS + 5
    observed: tuple[str, object] | None = None
    dead_holder = Q(pk__in=[])  # matches nothing until a dead holder is seen
    while True:
        now = timezone.now()
        lapsed = now - timedelta(seconds=LEASE_SECONDS)
        claimed = (
            Download.objects.filter(pk=download_id, state__in=ACTIVE_STATES)
            .filter(
                Q(lease_owner="") | Q(heartbeat_at__lt=lapsed) | Q(heartbeat_at=None) | dead_holder
            )
            .update(
                lease_owner=executor,
                heartbeat_at=now,
                state=Case(
                    When(state=DownloadState.QUEUED, then=Value(DownloadState.RUNNING.value)),
                    default=F("state"),
                ),
                started_at=Coalesce(F("started_at"), Value(now)),
            )
        )
        row = Download.objects.filter(pk=download_id).first()
        if row is None:
            return None
        if claimed:
            return row
        if not row.is_active:
            return None
        if leases.holder_dead(row.lease_owner):
            # Taken over only from that very holder: a conditional update on its name.
            dead_holder = Q(lease_owner=row.lease_owner)
            continue
        holder = (row.lease_owner, row.heartbeat_at)
        if observed is None:
            observed = holder
        elif holder != observed:
            logger.info("download %s is held by a live executor (%s)", download_id, row.lease_owner)
            return None
        if time.monotonic() > deadline:
            return None
        # A live holder moves its heartbeat every PROGRESS_INTERVAL: looking twice as often
        # sees it move (or the lease lapse) within one interval, not a fixed second later.
        time.sleep(PROGRESS_INTERVAL / 2)


class _DownloadRun:
    """One executor's run of one download (state held between the steps)."""

    def __init__(
        self,
        download: Download,
        executor: str,
        on_progress: ProgressCallback | None,
        should_cancel: Callable[[], bool] | None,
    ) -> None:
        self.download = download
        self.executor = executor
        self.on_progress = on_progress
        self.should_cancel = should_cancel or (lambda: False)
        self.bundle = spool.bundle_id(download.version, download.sha256)
        self.offset = 0
        self.hasher: StreamHasher | None = None  # SHA-256 of bytes 0..offset of the part file
        self.last_write = 0.0
        self.meter = RateMeter(time_constant=RATE_WINDOW)
        self.header_checked = False
        self.retries = 0

    # -- the whole run ----------------------------------------------------------------------

    def execute(self) -> str:
        d = self.download
        try:
            if d.bytes_done or d.transfers:
                _event(
                    f"Download of firmware {d.version} resumed at {d.percent:.0f}% "
                    "(its previous executor stopped)",
                    download=d.pk,
                    version=d.version,
                    executor=self.executor,
                )
            self._wait_for_other_executors()
            if d.state != DownloadState.VERIFYING:
                self._transfer()
                self._to_verifying()
            self._verify_and_publish()
            return DownloadState.READY.value
        except _Cancelled:
            spool.discard_part(self.bundle)
            return DownloadState.CANCELLED.value
        except _LeaseLost:
            return "lease lost"
        except _Rejected as exc:
            spool.discard_part(self.bundle)
            spool.discard_bundle(self.bundle)
            return self._fail(str(exc), rejected=True)
        except _Failed as exc:
            return self._fail(str(exc))
        except SoftTimeLimitExceeded:
            return self._fail(
                "it took longer than the task's time limit; Download again to resume where it "
                "stopped"
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return self._fail(
                    "the disk holding var/spool/updates is full; free some space and Download "
                    "again to resume where it stopped"
                )
            logger.exception("download %s failed", d.pk)
            return self._fail(f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            # A bug or something unforeseen: fail visibly, keep the part to resume.
            logger.exception("download %s failed", d.pk)
            return self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            if self.hasher is not None:
                self.hasher.close()

    def _fail(self, reason: str, *, rejected: bool = False) -> str:
        d = self.download
        if _finish(
            d.pk, DownloadState.FAILED, error=reason, rejected=rejected, owner=self.executor
        ):
            if rejected:
                message = f"Firmware {d.version} was rejected and deleted: {reason}"
            else:
                message = f"Download of firmware {d.version} failed: {reason}"
            _event(
                message,
                severity=Severity.ERROR,
                download=d.pk,
                version=d.version,
                url=d.url,
                reason=reason,
            )
            return DownloadState.FAILED.value
        return self._state_now()

    def _state_now(self) -> str:
        state = Download.objects.filter(pk=self.download.pk).values_list("state", flat=True).first()
        if state == DownloadState.CANCELLED:
            spool.discard_part(self.bundle)
        return str(state)

    # -- progress, lease and cancel ------------------------------------------------------------

    def _tick(self, *, force: bool = False, **fields: Any) -> None:
        """Persist progress (renewing the lease) at most every PROGRESS_INTERVAL; check cancel."""
        now_m = time.monotonic()
        if not force and now_m - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = now_m
        if self.should_cancel():
            self._cancel_here()
        now = timezone.now()
        updated = Download.objects.filter(
            pk=self.download.pk, state=self.download.state, lease_owner=self.executor
        ).update(heartbeat_at=now, progress_at=now, **fields)
        if not updated:
            row = Download.objects.filter(pk=self.download.pk).first()
            if row is None or row.state == DownloadState.CANCELLED:
                raise _Cancelled
            raise _LeaseLost
        for name, value in fields.items():
            setattr(self.download, name, value)
        if self.on_progress is not None:
            self.on_progress(self.download)

    def _cancel_here(self) -> None:
        """update-control's Ctrl-C: cancel the row as an administrator's Cancel would."""
        with contextlib.suppress(NoActiveDownload):
            download_cancel(user=f"{_os_user()} (update-control)", download_id=self.download.pk)
        raise _Cancelled

    def _progress(self, offset: int, *, force: bool = False) -> None:
        rate = self.meter.update(offset, time.monotonic())
        self._tick(force=force, bytes_done=offset, rate=rate)

    def _sleep(self, seconds: float) -> None:
        """Back off while keeping the lease and honouring a cancel."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, PROGRESS_INTERVAL))
            self._tick(force=True)

    def _wait_for_other_executors(self) -> None:
        """An executor of an earlier (cancelled) download may still be finishing a write."""
        d = self.download
        deadline = time.monotonic() + LEASE_SECONDS + 5
        while time.monotonic() < deadline:
            lapsed = timezone.now() - timedelta(seconds=LEASE_SECONDS)
            busy = (
                Download.objects.filter(component=d.component, heartbeat_at__gte=lapsed)
                .exclude(pk=d.pk)
                .exclude(lease_owner="")
                .exists()
            )
            if not busy:
                return
            self._sleep(PROGRESS_INTERVAL)

    # -- the transfer ----------------------------------------------------------------------------

    def _transfer(self) -> None:
        d = self.download
        spool.ensure_spool()
        spool.discard_other_parts(self.bundle)
        record = spool.read_record(self.bundle)
        if record is None or not record.same_bundle(d.url, d.size, d.sha256):
            # Bytes of another bundle (or of unknown origin) are never resumed.
            spool.discard_part(self.bundle)
            record = None
        self.offset = spool.part_size(self.bundle)
        if self.offset > d.size:
            spool.discard_part(self.bundle)
            record, self.offset = None, 0
        try:
            _check_space(d.size, d.version, d.url, d.sha256)
        except InsufficientSpace as exc:
            raise _Failed(str(exc)) from exc
        self._hash_prefix()
        self._progress(self.offset, force=True)

        while self.offset < d.size:
            validator = (record.etag or record.last_modified) if record else ""
            began_at = self.offset
            self.meter.resume(self.offset, time.monotonic())
            try:
                source = http.open_source(d.url, self.offset, validator=validator)
            except http.TransientError as exc:
                self._retry_or_fail(str(exc), made_progress=False)
                continue
            except http.FetchError as exc:
                raise _Failed(str(exc)) from exc
            try:
                record = self._start_transfer(source, record)
                self._receive(source)
            except (http.TransientError, *http.TRANSIENT_OS_ERRORS) as exc:
                self._retry_or_fail(http.describe(exc), made_progress=self.offset > began_at)
                continue
            finally:
                source.close()
            if self.offset < d.size:
                self._retry_or_fail(
                    f"the transfer ended at {self.offset} of {d.size} bytes",
                    made_progress=self.offset > began_at,
                )
        self._progress(self.offset, force=True)

    def _new_hasher(self) -> None:
        if self.hasher is not None:
            self.hasher.close()
        self.hasher = StreamHasher()

    def _hash_prefix(self) -> None:
        """Hash the kept part file so the whole-file digest covers the resumed bytes too."""
        self._new_hasher()
        if self.offset == 0:
            return
        part = spool.part_path(self.bundle)
        with part.open("rb") as handle:
            left = self.offset
            while left > 0:
                data = handle.read(min(CHUNK, left))
                if not data:
                    break
                self.hasher.update(data)
                left -= len(data)
                self._tick()
        if left:
            # The part file shrank under us: start over.
            spool.discard_part(self.bundle)
            self.offset = 0
            self._new_hasher()

    def _start_transfer(
        self, source: http.Source, record: spool.PartRecord | None
    ) -> spool.PartRecord:
        d = self.download
        if source.total is not None and source.total != d.size:
            raise _Rejected(
                f"the server offers {source.total} bytes but the feed lists {d.size} "
                "(a different or tampered bundle)"
            )
        if source.offset != self.offset:
            # The server ignored the Range (no resume support) or its file changed: byte 0.
            logger.info("download %s: the server restarts at byte %s", d.pk, source.offset)
            with spool.part_path(self.bundle).open("wb"):
                pass
            self.offset = 0
            self._new_hasher()
            self.header_checked = False
        new_record = spool.PartRecord(
            url=d.url,
            size=d.size,
            sha256=d.sha256,
            etag=source.etag,
            last_modified=source.last_modified,
        )
        if new_record != record:
            spool.write_record(self.bundle, new_record)
        resumed = self.offset > 0
        Download.objects.filter(pk=d.pk, lease_owner=self.executor).update(
            transfers=F("transfers") + 1,
            resumes=F("resumes") + (1 if resumed else 0),
        )
        d.transfers += 1
        d.resumes += 1 if resumed else 0
        return new_record

    def _receive(self, source: http.Source) -> None:
        d = self.download
        part = spool.part_path(self.bundle)
        with part.open("r+b" if part.exists() else "wb") as out:
            out.seek(self.offset)
            out.truncate()
            while True:
                data = source.read(CHUNK)
                if not data:
                    break
                if self.offset + len(data) > d.size:
                    raise _Rejected(
                        f"the server sent more than the {d.size} bytes the feed lists "
                        "(an oversized or different bundle)"
                    )
                out.write(data)
                self.hasher.update(data)
                self.offset += len(data)
                if time.monotonic() - self.last_write >= PROGRESS_INTERVAL:
                    out.flush()
                    self._probe_header()
                    self._progress(self.offset)
            out.flush()

    def _probe_header(self) -> None:
        """As soon as the signed header is in, check it: a bad signature stops the download."""
        if self.header_checked or self.offset < min(HEADER_PROBE_BYTES, self.download.size):
            return
        try:
            manifest = appliance_bundle.read_manifest(spool.part_path(self.bundle), partial=True)
        except appliance_bundle.BundleDigestMismatch:
            return  # the header is not all in yet
        except appliance_bundle.BundleError as exc:
            raise _Rejected(str(exc)) from exc
        self.header_checked = True
        self._check_manifest(manifest)

    def _check_manifest(self, manifest: Any) -> None:
        """The signed manifest, not the (unsigned) feed, says what the bundle is."""
        d = self.download
        if manifest.version != d.version:
            raise _Rejected(
                f"the feed lists it as firmware {d.version} but the signed bundle is "
                f"firmware {manifest.version}"
            )
        total = getattr(manifest, "total_size", None)
        if total is not None and total != d.size:
            raise _Rejected(f"the signed bundle is {total} bytes but the feed lists {d.size}")

    def _retry_or_fail(self, reason: str, *, made_progress: bool) -> None:
        d = self.download
        self.retries = 0 if made_progress else self.retries + 1
        if self.retries > MAX_RETRIES:
            raise _Failed(f"{reason}; gave up after {MAX_RETRIES} retries")
        delay = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** max(0, self.retries - 1)))
        percent = 100.0 * self.offset / d.size if d.size else 0.0
        _event(
            f"Transfer of firmware {d.version} interrupted at {percent:.0f}% ({reason}); "
            f"retrying in {delay:g} s",
            severity=Severity.WARNING,
            download=d.pk,
            version=d.version,
            offset=self.offset,
            retry=self.retries,
        )
        self._progress(self.offset, force=True)  # where it stopped, for the page and a resume
        self._sleep(delay)

    # -- verification ----------------------------------------------------------------------------

    def _to_verifying(self) -> None:
        now = timezone.now()
        updated = Download.objects.filter(
            pk=self.download.pk, state=DownloadState.RUNNING, lease_owner=self.executor
        ).update(
            state=DownloadState.VERIFYING,
            bytes_done=self.offset,
            rate=0.0,
            verified_bytes=0,
            heartbeat_at=now,
            progress_at=now,
        )
        if not updated:
            self._tick(force=True)  # raises _Cancelled or _LeaseLost
            raise _LeaseLost
        self.download.state = DownloadState.VERIFYING
        self.download.bytes_done = self.offset
        if self.on_progress is not None:
            self.on_progress(self.download)

    def _verify_and_publish(self) -> None:
        d = self.download
        part, final = spool.part_path(self.bundle), spool.bundle_path(self.bundle)
        path = part if part.is_file() else final if final.is_file() else None
        if path is None:
            raise _Failed("the downloaded file is gone from var/spool/updates; download it again")
        if self.hasher is not None and self.offset == d.size and path == part:
            digest = self.hasher.hexdigest()  # computed while the bytes came in
        else:
            # Resumed after the transfer (a worker died while verifying): hash the file again.
            whole = hashlib.sha256()
            with path.open("rb") as handle:
                while data := handle.read(CHUNK):
                    whole.update(data)
                    self._tick()
            digest = whole.hexdigest()
        size = path.stat().st_size
        if size != d.size:
            raise _Rejected(f"the file has {size} bytes but the feed lists {d.size}")
        if digest != d.sha256.lower():
            raise _Rejected(f"its SHA-256 ({digest}) does not match the update feed's ({d.sha256})")

        def progress(done: int, total: int) -> None:
            self._tick(verified_bytes=round(d.size * done / total) if total else d.size)

        try:
            manifest = appliance_bundle.verify_bundle(path, progress=progress)
        except appliance_bundle.BundleError as exc:
            raise _Rejected(str(exc)) from exc
        self._check_manifest(manifest)
        installed = selectors.installed_version()
        eligibility = selectors.offer_eligibility(manifest.version, manifest.min_version, installed)
        if not eligibility.downloadable:
            raise _Rejected(f"the signed bundle says it is {eligibility.label}")
        if path == part:
            self._tick(force=True)  # renew the lease before the fsync, which may take a while
            try:
                final = spool.publish_bundle(self.bundle)
            except FileNotFoundError:
                # An executor that took over after a stall published these verified bytes.
                if not final.is_file():
                    raise
        if not _finish(
            d.pk,
            DownloadState.READY,
            from_states=(DownloadState.VERIFYING,),
            owner=self.executor,
            verified_bytes=d.size,
            bytes_done=d.size,
            rate=0.0,
            file_name=final.name,
        ):
            state = self._state_now()
            if state == DownloadState.CANCELLED:
                spool.discard_bundle(self.bundle)
                raise _Cancelled
            raise _LeaseLost
        _event(
            f"Firmware {d.version} is ready to install",
            download=d.pk,
            version=d.version,
            size=d.size,
            sha256=d.sha256,
            file=f"var/spool/updates/{final.name}",
            key_id=getattr(manifest, "key_id", ""),
        )
        if self.on_progress is not None:
            d.refresh_from_db()
            self.on_progress(d)


def _finish(
    download_id: int,
    state: DownloadState,
    *,
    from_states: tuple[DownloadState, ...] = ACTIVE_STATES,
    owner: str | None = None,
    **fields: Any,
) -> bool:
    """The conditional update into a final state (by the lease holder when ``owner`` is given).

    The holder gives its lease back in the same update, so nobody ever sees a finished download
    that is still held.
    """
    query = Download.objects.filter(pk=download_id, state__in=from_states)
    if owner is not None:
        query = query.filter(lease_owner=owner)
        fields.setdefault("lease_owner", "")
    return bool(query.update(state=state, finished_at=timezone.now(), **fields))


def _os_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (ImportError, KeyError, OSError):
        return "root"
