"""Writes of Updates & Licensing: feed checks, firmware downloads, the update settings, licenses.

A download (the guide's phase 1) is a Download row and its job of the job engine, created here
with the job enqueued on commit; upgrades/downloader.py runs it, in the worker or in
update-control, and the engine's reconciler resumes it when its executor dies.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from appliance.firmware import feed as appliance_feed
from appliance.firmware import license as appliance_license
from appliance.firmware import spool
from appliance.system.errors import ApplianceError
from events.models import Severity
from events.services import User, username_of
from jobs import engine as jobs_engine
from jobs.models import JobState
from upgrades import http, selectors
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
from upgrades.phase_context import event

logger = logging.getLogger(__name__)


# The job engine's kind of a download (upgrades.downloader runs it).
DOWNLOAD_KIND = "download"
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
        check = _check_record(
            trigger,
            username,
            document,
            started,
            checked_at=now,
            ok=True,
            offers_listed=len(entries),
            newest_available=newest.offer.version if newest else "",
        )
        for offer in new_offers:
            eligibility = selectors.offer_eligibility(offer.version, offer.min_version, installed)
            if eligibility.downloadable:
                event(
                    f"Firmware {offer.version} is available",
                    version=offer.version,
                    size=offer.size,
                    release_notes=offer.release_notes[:2000],
                )
        if trigger != CheckTrigger.SCHEDULE:
            found = (
                f"firmware {newest.offer.version} is available" if newest else "no newer firmware"
            )
            event(
                f"Checked for firmware updates: {found}",
                user=user,
                feed=document,
                offers=len(entries),
            )
    _prune_checks()
    if newest is not None:
        _maybe_download_automatically(newest)
    return check


def _check_record(
    trigger: CheckTrigger | str, username: str, document: str, started: float, **outcome: Any
) -> UpdateCheck:
    """The check's row: who asked, which feed, how long it took (until now), and ``outcome``."""
    return UpdateCheck.objects.create(
        trigger=trigger,
        requested_by=username,
        feed_url=document,
        duration_ms=round((time.monotonic() - started) * 1000),
        **outcome,
    )


def _check_failed(
    trigger: CheckTrigger | str, username: str, document: str, error: str, started: float
) -> UpdateCheck:
    check = _check_record(trigger, username, document, started, ok=False, error=error)
    event(
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
        event(
            f"Automatic download of firmware {offer.version} did not start: {exc}",
            severity=Severity.WARNING,
            version=offer.version,
        )
    except UpdateError as exc:
        logger.info("automatic download of %s not started: %s", offer.version, exc)


# --- Starting and cancelling downloads --------------------------------------------


def _space_needed(offer_size: int, version: str, url: str, sha256: str) -> int:
    bundle = spool.bundle_id(version, sha256)
    record = spool.read_record(bundle)
    kept = spool.part_size(bundle) if record and record.same_bundle(url, offer_size, sha256) else 0
    return max(0, offer_size - kept) + spool.FREE_SPACE_MARGIN


def check_space(size: int, version: str, url: str, sha256: str) -> None:
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
    """Create a queued download of ``version`` (default: the newest that applies) with its
    job, and enqueue the job on commit.

    With ``enqueue=False`` the caller runs ``downloader.download_execute`` itself
    (update-control -d fw); should it die, the reconciler hands the job to a worker.
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
    check_space(offer.size, offer.version, offer.url, offer.sha256)

    with transaction.atomic():
        job = jobs_engine.start(
            DOWNLOAD_KIND,
            title=f"Download of firmware {offer.version}",
            user=user,
            trigger=str(trigger),
            steps=2,
            bytes_total=offer.size,
            details={"version": offer.version},
            enqueue_on_commit=enqueue,
        )
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
                    requested_by=username_of(user),
                    job=job,
                )
        except IntegrityError:
            raise _in_progress(selectors.active_download()) from None
        how = "" if trigger != DownloadTrigger.AUTOMATIC else " (automatic firmware downloads)"
        event(
            f"Download of firmware {offer.version} started{how}",
            user=user,
            download=download.pk,
            job=job.pk,
            version=offer.version,
            size=offer.size,
            url=offer.url,
        )
    return download


def _in_progress(active: Download | None) -> DownloadInProgress:
    if active is None:
        return DownloadInProgress("A firmware download is already in progress.")
    return DownloadInProgress(
        f"A firmware download is already in progress: firmware {active.version}, "
        f"{active.percent:.0f}% ({DownloadState(active.state).label.lower()}). "
        "Cancel it first, or wait for it to finish."
    )


def download_cancel(*, user: User | None, download_id: int | None = None) -> Download:
    """Cancel the active download; the executor (or this, when none is alive) deletes the part."""
    download = selectors.active_download()  # at most one: a partial unique index
    if download is None or (download_id is not None and download.pk != download_id):
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
    if download.job_id is not None:
        # Queued, or nobody runs it any more: the job ends now, and the part file goes here.
        # A live executor sees the cancel at its next progress write, deletes the part itself
        # and ends its job.
        with contextlib.suppress(jobs_engine.JobError):
            job = jobs_engine.cancel(download.job_id, user=user)
            if job.state == JobState.CANCELLED:
                spool.discard_part(spool.bundle_id(download.version, download.sha256))
    else:
        spool.discard_part(spool.bundle_id(download.version, download.sha256))
    event(
        f"Download of firmware {download.version} cancelled at {download.percent:.0f}%",
        user=user,
        download=download.pk,
        version=download.version,
        bytes_done=download.bytes_done,
    )
    return download


def automatic_downloads_set(*, enabled: bool, user: User | None) -> UpdateSettings:
    """Turn automatic firmware downloads on or off (an event either way)."""
    row, _ = UpdateSettings.objects.get_or_create(pk=1)
    if row.automatic_downloads != enabled:
        UpdateSettings.objects.filter(pk=1).update(
            automatic_downloads=enabled, changed_at=timezone.now(), changed_by=username_of(user)
        )
        event(f"Automatic firmware downloads turned {'on' if enabled else 'off'}", user=user)
        row.refresh_from_db()
        if enabled and (newest := selectors.newest_downloadable()) is not None:
            _maybe_download_automatically(newest)
    return row


def license_install(data: bytes, *, user: User | None) -> Any:
    """Install an uploaded license file; a refused file raises UpdateError with the reason."""
    try:
        installed = appliance_license.install_license(data)
    except (appliance_license.LicenseError, ApplianceError, ValueError) as exc:
        event(f"A license file was refused: {exc}", severity=Severity.WARNING, user=user)
        raise UpdateError(f"The license file was refused: {exc}") from exc
    event(
        f"License installed for {installed.customer}: updates until {installed.updates_until}",
        user=user,
        customer=installed.customer,
        serial=installed.serial,
        updates_until=str(installed.updates_until),
    )
    return installed
