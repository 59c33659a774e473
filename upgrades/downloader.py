"""Running a firmware download on the job engine: transfer, resume, verify, publish.

A Download row is created with its job (``services.download_start``); the worker's ``jobs.run``
task, or update-control in the foreground (``download_execute``), claims the job, which takes
its lease and moves its fence on. Every write here is conditional on still holding that job
(``_mine``), so a redelivered task or an executor that stalled past its lease can never write
over another's progress, and a process that died leaves a job the reconciler hands to a worker,
which resumes the kept part file (``on_dead="resume"``). The bytes stream into
var/spool/updates as a part file, hashed as they arrive; a later transfer of the same bundle
resumes it with an HTTP Range request. Only after the file's SHA-256 matches the feed and
``verify_bundle`` accepts the signature, the payload digest and every path is the bundle
renamed into place and called ready; the download's final state and its job's are written in
one transaction.

One module a little over 600 lines on purpose: the transfer, the resume, the two digests, the
verification and the publish all read and write one run's state (``_DownloadRun``), and split
apart each would reach into the others'.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from appliance.firmware import bundle as appliance_bundle
from appliance.firmware import spool
from events.models import Category, Severity
from events.services import User
from jobs import engine, leases, registry
from jobs.models import Job, JobState
from lmi.progress import RateMeter
from upgrades import http, selectors
from upgrades.hashing import StreamHasher
from upgrades.models import ACTIVE_STATES, Download, DownloadState
from upgrades.phase_context import event
from upgrades.services import (
    DOWNLOAD_KIND,
    InsufficientSpace,
    NoActiveDownload,
    check_space,
    download_cancel,
)

logger = logging.getLogger(__name__)

# An executor renews its lease with every progress write (PROGRESS_INTERVAL); one silent for
# LEASE_SECONDS is gone and the reconciler hands the download to a worker. The lease must
# outlast the longest silence of a live executor: a read blocked for http.TIMEOUT.
PROGRESS_INTERVAL = 0.5
LEASE_SECONDS = 30.0
# Consecutive failed transfers (without a byte of progress) before the download gives up, and
# the backoff between them: 1, 2, 4, 8, 16 s (capped).
MAX_RETRIES = 5
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
CHUNK = 1024 * 1024
RATE_WINDOW = 5.0  # the shown rate's time constant (lmi.progress.RateMeter), in seconds
HEADER_PROBE_BYTES = 4096  # try the signed header once this much is in
# What the download's final state makes of its job.
JOB_OUTCOME = {
    DownloadState.READY: JobState.SUCCEEDED,
    DownloadState.FAILED: JobState.FAILED,
    DownloadState.CANCELLED: JobState.CANCELLED,
}


class _Rejected(Exception):
    """The bundle itself is refused (digest, signature, size): delete it, do not retry."""


class _Failed(Exception):
    """The download stops; the part file is kept so Download again resumes it."""


class _Cancelled(Exception):
    """The download was cancelled: delete the part file."""


class _LeaseLost(Exception):
    """Another executor holds the download now: stop touching the spool."""


ProgressCallback = Callable[[Download], None]


def download_execute(
    download_id: int,
    *,
    executor: str | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    user: User | None = None,
) -> str:
    """Run (or resume) a download to its end in this process; returns the state it left.

    ``should_cancel`` is asked at every progress write (update-control's Ctrl-C); the cancel is
    then ``user``'s, as an administrator's Cancel would be. Refuses, returning the current
    state, when the download is no longer active or a live executor holds its job.
    """
    download = Download.objects.filter(pk=download_id).first()
    if download is None:
        return "missing"
    if download.job_id is None or not download.is_active:
        return str(download.state)
    lease = engine.claim(download.job_id, executor or leases.executor_name("here"))
    if lease is None:
        download.refresh_from_db()
        return str(download.state)
    return _DownloadRun(download, lease, on_progress, should_cancel, user).execute()


def download_job_run(lease: engine.Lease) -> None:
    """The download kind's ``run``: the worker's claimed job, resumed where its row says."""
    download = Download.objects.filter(job_id=lease.job_id).first()
    if download is None:
        lease.finish(JobState.FAILED, error="its download record is gone")
        return
    if _DownloadRun(download, lease).execute() == "lease lost":
        raise engine.LeaseLost(f"download {download.pk} is held by another executor")


def register_job_kind() -> None:
    """The download kind of the job engine (UpgradesConfig.ready)."""
    registry.register(
        registry.Kind(
            name=DOWNLOAD_KIND,
            label="Firmware download",
            category=Category.UPDATE,
            run=download_job_run,
            on_dead="resume",  # the part file and its record let any executor go on
            max_restarts=5,
            cancellable=True,
            lease_seconds=LEASE_SECONDS,
            own_events=True,
        )
    )


class OtherSource(Protocol):
    """Somewhere other than the feed that may serve a bundle's bytes (a cluster member's
    Central, cluster.bundles): ``open`` starts a transfer there, or returns None to send the
    rest of the run to the feed."""

    def open(self, offset: int, validator: str) -> http.Source | None: ...


# Who offers another source for a bundle (version, SHA-256): the cluster app registers its
# own at start-up (cluster.apps), so this app, which the cluster app builds on, never imports it.
_SOURCE_FINDERS: list[Callable[[str, str], OtherSource | None]] = []


def register_source_finder(finder: Callable[[str, str], OtherSource | None]) -> None:
    if finder not in _SOURCE_FINDERS:
        _SOURCE_FINDERS.append(finder)


def _central_source(download: Download) -> OtherSource | None:
    """The first other source that serves this bundle (a member's Cluster Central), or None."""
    for finder in _SOURCE_FINDERS:
        if (source := finder(download.version, download.sha256)) is not None:
            return source
    return None


class _DownloadRun:
    """One executor's run of one download (state held between the steps)."""

    def __init__(
        self,
        download: Download,
        lease: engine.Lease,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        user: User | None = None,
    ) -> None:
        self.download = download
        self.user = user
        self.lease = lease
        self.executor = lease.owner
        self.on_progress = on_progress
        self.should_cancel = should_cancel or (lambda: False)
        self.bundle = spool.bundle_id(download.version, download.sha256)
        self.offset = 0
        # SHA-256 of bytes 0..offset of the part file, and of the payload within them
        self.hasher: StreamHasher | None = None
        self.whole = hashlib.sha256()
        self.payload = appliance_bundle.PayloadDigest()
        self.last_write = 0.0
        self.meter = RateMeter(time_constant=RATE_WINDOW)
        self.header_checked = False
        self.retries = 0

    def _mine(self) -> QuerySet[Download]:
        """This download, while this executor still holds its job: every write goes through it."""
        return Download.objects.filter(
            pk=self.download.pk,
            job_id=self.lease.job_id,
            job__fence=self.lease.fence,
            job__state=JobState.RUNNING,
        )

    def _finish(
        self, state: DownloadState, *, from_states: Any = ACTIVE_STATES, **fields: Any
    ) -> bool:
        """The download's final state and its job's, in one transaction; False when this
        executor no longer holds the job (or the download already left ``from_states``)."""
        error = str(fields.get("error", ""))
        with transaction.atomic():
            if (
                not self._mine()
                .filter(state__in=from_states)
                .update(state=state, finished_at=timezone.now(), **fields)
            ):
                return False
            return self.lease.finish(JOB_OUTCOME[state], error=error)

    def _settle(self) -> None:
        """A download that is already final gives its job the same end (an executor that died
        between the two writes of an earlier run, or a cancel while nobody ran it)."""
        state = DownloadState(self.download.state)
        if state in JOB_OUTCOME:
            if state == DownloadState.CANCELLED:
                spool.discard_part(self.bundle)
            self.lease.finish(JOB_OUTCOME[state], error=self.download.error)

    # -- the whole run ----------------------------------------------------------------------

    def execute(self) -> str:
        d = self.download
        now = timezone.now()
        self._mine().filter(state=DownloadState.QUEUED).update(state=DownloadState.RUNNING)
        self._mine().filter(started_at__isnull=True).update(started_at=now)
        d.refresh_from_db()
        if not d.is_active:
            self._settle()
            return str(d.state)
        try:
            if d.bytes_done or d.transfers:
                event(
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
            self.lease.finish(JobState.CANCELLED, error="Cancelled")
            return DownloadState.CANCELLED.value
        except (_LeaseLost, engine.LeaseLost):
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
        if self._finish(DownloadState.FAILED, error=reason, rejected=rejected):
            if rejected:
                message = f"Firmware {d.version} was rejected and deleted: {reason}"
            else:
                message = f"Download of firmware {d.version} failed: {reason}"
            event(
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
            with contextlib.suppress(engine.LeaseLost):
                self.lease.finish(JobState.CANCELLED, error="Cancelled")
        return str(state)

    # -- progress, lease and cancel ------------------------------------------------------------

    def _tick(self, *, force: bool = False, **fields: Any) -> None:
        """Persist progress (renewing the job's lease) at most every PROGRESS_INTERVAL; check
        cancel."""
        now_m = time.monotonic()
        if not force and now_m - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = now_m
        if self.should_cancel():
            self._cancel_here()
        updated = (
            self._mine()
            .filter(state=self.download.state)
            .update(progress_at=timezone.now(), **fields)
        )
        if not updated:
            row = Download.objects.filter(pk=self.download.pk).first()
            if row is None or row.state == DownloadState.CANCELLED:
                raise _Cancelled
            raise _LeaseLost
        for name, value in fields.items():
            setattr(self.download, name, value)
        d = self.download
        verifying = d.state == DownloadState.VERIFYING
        self.lease.progress(
            step=1 if verifying else 0,
            steps=2,
            step_name="Verifying the signature" if verifying else "Transferring",
            bytes_done=d.verified_bytes if verifying else d.bytes_done,
            bytes_total=d.size,
            rate=0.0 if verifying else d.rate,  # the transfer's own, aware of its pauses
        )
        if self.on_progress is not None:
            self.on_progress(self.download)

    def _cancel_here(self) -> None:
        """update-control's Ctrl-C: cancel the row as an administrator's Cancel would."""
        with contextlib.suppress(NoActiveDownload):
            download_cancel(user=self.user, download_id=self.download.pk)
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
        deadline = time.monotonic() + LEASE_SECONDS + 5
        while time.monotonic() < deadline:
            now = timezone.now()
            others = Job.objects.filter(
                kind=DOWNLOAD_KIND, state=JobState.RUNNING, lease_expires_at__gte=now
            ).exclude(pk=self.lease.job_id)
            if not any(not leases.holder_dead(job.lease_owner) for job in others):
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
            check_space(d.size, d.version, d.url, d.sha256)
        except InsufficientSpace as exc:
            raise _Failed(str(exc)) from exc
        self._hash_prefix()
        self._progress(self.offset, force=True)
        # A cluster member takes the bytes from its Cluster Central when Central serves this
        # bundle (cluster.bundles), else from the feed; every check here is the same for both.
        central = _central_source(d)

        while self.offset < d.size:
            validator = (record.etag or record.last_modified) if record else ""
            began_at = self.offset
            self.meter.resume(self.offset, time.monotonic())
            try:
                source = central.open(self.offset, validator) if central else None
                source = source or http.open_source(d.url, self.offset, validator=validator)
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
        self.whole = hashlib.sha256()
        self.payload = appliance_bundle.PayloadDigest()
        self.hasher = StreamHasher(self.whole, self.payload)

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
        self._mine().update(
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
        event(
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
        updated = (
            self._mine()
            .filter(state=DownloadState.RUNNING)
            .update(
                state=DownloadState.VERIFYING,
                bytes_done=self.offset,
                rate=0.0,
                verified_bytes=0,
                progress_at=timezone.now(),
            )
        )
        if not updated:
            self._tick(force=True)  # raises _Cancelled or _LeaseLost
            raise _LeaseLost
        self.download.state = DownloadState.VERIFYING
        self.download.bytes_done = self.offset
        self.download.verified_bytes = 0
        self._tick(force=True)  # the job's step moves to verifying

    def _verify_and_publish(self) -> None:
        d = self.download
        part, final = spool.part_path(self.bundle), spool.bundle_path(self.bundle)
        path = part if part.is_file() else final if final.is_file() else None
        if path is None:
            raise _Failed("the downloaded file is gone from var/spool/updates; download it again")
        payload: appliance_bundle.PayloadDigest | None = None
        if self.hasher is not None and self.offset == d.size and path == part:
            self.hasher.close()  # both digests were computed while the bytes came in
            digest, payload = self.whole.hexdigest(), self.payload
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
            manifest = appliance_bundle.verify_bundle(path, progress=progress, payload=payload)
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
        if not self._finish(
            DownloadState.READY,
            from_states=(DownloadState.VERIFYING,),
            verified_bytes=d.size,
            bytes_done=d.size,
            rate=0.0,
            file_name=final.name,
        ):
            if self._state_now() == DownloadState.CANCELLED:
                spool.discard_bundle(self.bundle)
                raise _Cancelled
            raise _LeaseLost
        event(
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
