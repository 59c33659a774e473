"""The download service over real HTTP on 127.0.0.1: resume, retries, cancel, one at a time."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.utils import timezone

from appliance.firmware import spool
from events.models import Event
from jobs import engine
from jobs.models import Job, JobState
from tests.upgrades import bundles
from tests.upgrades.conftest import offered_bundle, run_download, start_download
from upgrades import downloader, selectors, services
from upgrades.models import Download, DownloadState, DownloadTrigger

pytestmark = pytest.mark.django_db


def _events(text: str) -> list[Event]:
    return list(Event.objects.filter(category="update", message__contains=text))


def test_it_downloads_verifies_and_publishes_the_bundle(firmware):
    path = firmware.build()
    firmware.offer(path)

    download = run_download()

    assert download.state == DownloadState.READY
    assert download.bytes_done == download.size == path.stat().st_size
    published = spool.bundle_path(offered_bundle())
    assert published.read_bytes() == path.read_bytes()
    assert not spool.part_path(offered_bundle()).exists()
    assert not spool.record_path(offered_bundle()).exists()
    assert published.parent == spool.spool_dir()
    digest = bundles.sha256_of(path)
    assert str(published).endswith(f"var/spool/updates/firmware-2.8.1.0-{digest[:12]}.bundle")
    assert download.file_name == published.name
    # Its job, in the one shape every kind of long work has (plain JSON for the API and CLI).
    shown = selectors.download_dict(download)["job"]
    assert json.loads(json.dumps(shown)) == shown
    assert (shown["kind"], shown["state"], shown["percent"]) == ("download", "succeeded", 100.0)
    [ready] = _events("is ready to install")
    assert ready.details["sha256"] == bundles.sha256_of(path)
    assert _events("Download of firmware 2.8.1.0 started")[0].username == "admin"


def test_it_resumes_with_range_after_cuts_at_several_points(firmware):
    path = firmware.build()
    size = path.stat().st_size
    firmware.offer(path)
    cuts = [1000, size // 3, size // 2, size - 10]
    firmware.server.cuts = list(cuts)

    download = run_download()

    assert download.state == DownloadState.READY, download.error
    transfers = firmware.server.downloads_of(path.name)
    assert [t.status for t in transfers] == [200, 206, 206, 206, 206]
    assert [t.start for t in transfers] == [0, *cuts]
    assert [t.range for t in transfers[1:]] == [f"bytes={cut}-" for cut in cuts]
    assert download.transfers == 5
    assert download.resumes == 4
    assert spool.bundle_path(offered_bundle()).read_bytes() == path.read_bytes()
    assert len(_events("interrupted")) == 4


def test_a_server_without_range_support_restarts_from_byte_zero(firmware):
    path = firmware.build()
    size = path.stat().st_size
    firmware.offer(path)
    firmware.server.ranges = False
    firmware.server.cuts = [size // 4, size // 2]

    download = run_download()

    assert download.state == DownloadState.READY, download.error
    transfers = firmware.server.downloads_of(path.name)
    assert [t.status for t in transfers] == [200, 200, 200]
    assert [t.range for t in transfers] == [None, f"bytes={size // 4}-", f"bytes={size // 2}-"]
    assert all(t.start == 0 for t in transfers)
    assert download.resumes == 0
    assert hashlib.sha256(spool.bundle_path(offered_bundle()).read_bytes()).hexdigest() == (
        bundles.sha256_of(path)
    )


def test_it_retries_server_errors_with_backoff_and_then_finishes(firmware):
    path = firmware.build()
    firmware.offer(path)
    firmware.server.fail_next = [503, 502]

    download = run_download()

    assert download.state == DownloadState.READY
    assert [t.status for t in firmware.server.downloads_of(path.name)] == [503, 502, 200]
    first, second = sorted(_events("interrupted"), key=lambda e: e.id)
    assert "503 Service Unavailable" in first.message and "retrying in 0.05 s" in first.message
    assert "502 Bad Gateway" in second.message and "retrying in 0.1 s" in second.message


def test_it_gives_up_after_the_retry_limit_keeping_the_part_to_resume_later(firmware):
    path = firmware.build()
    size = path.stat().st_size
    firmware.offer(path)
    firmware.server.cuts = [size // 2]
    firmware.server.fail_next = []

    # The first transfer is cut half-way; every later request gets a 503.
    original = firmware.server.take_failure
    calls = {"n": 0}

    def failing() -> int | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else 503

    firmware.server.take_failure = failing  # type: ignore[method-assign]
    download = run_download()

    assert download.state == DownloadState.FAILED
    assert f"gave up after {downloader.MAX_RETRIES} retries" in download.error
    assert "503" in download.error
    assert spool.part_size(offered_bundle()) == size // 2
    assert _events("Download of firmware 2.8.1.0 failed")

    # Download again once the server is back: it resumes the kept part with a Range request.
    firmware.server.take_failure = original  # type: ignore[method-assign]
    again = run_download()

    assert again.state == DownloadState.READY
    assert again.resumes == 1
    assert firmware.server.downloads_of(path.name)[-1].range == f"bytes={size // 2}-"


def test_a_part_file_of_another_bundle_is_not_resumed(firmware):
    path = firmware.build()
    firmware.offer(path)
    spool.ensure_spool()
    # Bytes under this bundle's name whose record names another URL, and another bundle's part.
    spool.part_path(offered_bundle()).write_bytes(b"x" * 5000)
    spool.write_record(
        offered_bundle(),
        spool.PartRecord(
            url="http://127.0.0.1:9/elsewhere.bundle",
            size=path.stat().st_size,
            sha256=bundles.sha256_of(path),
        ),
    )
    other = spool.bundle_id("2.8.0.5", "ab" * 32)
    spool.part_path(other).write_bytes(b"y" * 5000)

    download = run_download()

    assert download.state == DownloadState.READY
    assert [t.range for t in firmware.server.downloads_of(path.name)] == [None]
    assert download.resumes == 0
    assert not spool.part_path(other).exists()


def test_one_download_at_a_time_is_enforced_by_the_database(firmware):
    firmware.offer(firmware.build())
    first = start_download()

    with pytest.raises(
        services.DownloadInProgress, match=r"already in progress: firmware 2\.8\.1\.0"
    ):
        start_download()
    with pytest.raises(IntegrityError):
        Download.objects.create(
            version="2.8.1.0", url="x", size=1, sha256="0" * 64, trigger=DownloadTrigger.CLI
        )
    assert first.state == DownloadState.QUEUED


def test_cancel_between_chunks_deletes_the_part_file(firmware):
    path = firmware.build(payload_bytes=4 * 1024 * 1024)
    firmware.offer(path)
    firmware.server.rate = 2 * 1024 * 1024
    seen: list[float] = []

    def cancel_half_way(download: Download) -> None:
        seen.append(download.percent)
        if download.state == DownloadState.RUNNING and download.percent > 20:
            services.download_cancel(user="admin")

    download = run_download(on_progress=cancel_half_way)

    assert download.state == DownloadState.CANCELLED
    assert 20 < max(seen) < 100
    assert not spool.part_path(offered_bundle()).exists()
    assert not spool.bundle_path(offered_bundle()).exists()
    [event] = _events("cancelled")
    assert event.username == "admin"


def test_cancelling_a_queued_download_deletes_its_kept_part(firmware):
    firmware.offer(firmware.build())
    download = start_download()
    spool.ensure_spool()
    spool.part_path(offered_bundle()).write_bytes(b"partial")

    services.download_cancel(user="admin")

    download.refresh_from_db()
    assert download.state == DownloadState.CANCELLED
    assert not spool.part_path(offered_bundle()).exists()
    assert downloader.download_execute(download.pk) == DownloadState.CANCELLED
    assert download.job.state == JobState.CANCELLED


def test_a_redelivered_task_for_a_finished_download_does_nothing(firmware):
    firmware.offer(firmware.build())
    download = run_download()
    requests = len(firmware.server.requests)

    assert downloader.download_execute(download.pk) == DownloadState.READY
    assert len(firmware.server.requests) == requests
    assert download.job.state == JobState.SUCCEEDED and not download.job.lease_owner


def _dead_executor() -> str:
    """An executor name whose process on this host has ended (its pid reaped)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return f"here:{socket.gethostname()}:{gone.pid}:dead"


def test_an_executor_takes_over_from_a_dead_one_and_resumes_the_part(firmware, monkeypatch):
    path = firmware.build()
    size = path.stat().st_size
    firmware.offer(path)
    firmware.server.cuts = [size // 2]
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # the first executor stops at the cut
    download = start_download()

    # A first executor that dies at the cut: its job stays running, held by a gone process.
    def die(download: Download) -> None:
        if download.bytes_done >= size // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        downloader.download_execute(download.pk, executor=_dead_executor(), on_progress=die)
    download.refresh_from_db()
    assert (download.state, download.job.state) == (DownloadState.RUNNING, JobState.RUNNING)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 5)

    assert downloader.download_execute(download.pk, executor="second") == DownloadState.READY
    download.refresh_from_db()
    assert download.resumes == 1
    assert download.job.state == JobState.SUCCEEDED
    assert firmware.server.downloads_of(path.name)[-1].range == f"bytes={size // 2}-"
    assert _events("resumed at 50%")


def test_a_live_holder_keeps_the_download(firmware):
    firmware.offer(firmware.build())
    download = start_download()
    Job.objects.filter(pk=download.job_id).update(
        state=JobState.RUNNING,
        lease_owner="job:elsewhere:1:alive",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
        fence=1,
    )
    Download.objects.filter(pk=download.pk).update(state=DownloadState.RUNNING)

    assert downloader.download_execute(download.pk, executor="duplicate") == DownloadState.RUNNING
    download.refresh_from_db()
    assert download.job.lease_owner == "job:elsewhere:1:alive"
    assert firmware.server.downloads_of("lmi-firmware-2.8.1.0.bundle") == []


def test_a_write_of_an_executor_that_lost_its_job_changes_nothing(firmware):
    firmware.offer(firmware.build())
    download = start_download()
    stalled = engine.claim(download.job_id, "job:elsewhere:1:stalled")
    assert stalled is not None
    # The reconciler gave the job to another executor meanwhile (the fence moved on).
    Job.objects.filter(pk=download.job_id).update(fence=stalled.fence + 1)

    assert downloader.download_execute(download.pk, executor="late") == DownloadState.QUEUED
    run = downloader._DownloadRun(download, stalled)
    assert run.execute() == "lease lost"
    download.refresh_from_db()
    assert (download.state, download.bytes_done, download.transfers) == (DownloadState.QUEUED, 0, 0)


def test_a_local_directory_feed_goes_through_the_same_download_and_checks(
    settings, tmp_path, vendor, licensed
):
    feed_dir = tmp_path / "feed"
    feed_dir.mkdir()
    path = bundles.build(vendor, feed_dir / "lmi-firmware-2.8.1.0.bundle")
    bundles.write_feed(feed_dir, (path, "2.8.1.0", "2.8.0.0"))
    settings.UPDATE_FEED_URL = str(feed_dir)
    assert services.update_check(trigger="user").ok
    progress: list[int] = []

    download = run_download(on_progress=lambda d: progress.append(d.bytes_done))

    assert download.state == DownloadState.READY
    assert download.url == str(path)
    assert progress[-1] == path.stat().st_size
    assert spool.bundle_path(offered_bundle()).read_bytes() == path.read_bytes()


def test_it_refuses_to_start_without_room_in_the_spool(firmware, monkeypatch):
    firmware.offer(firmware.build())
    monkeypatch.setattr(spool, "free_bytes", lambda root=None: 10 * 1024 * 1024)

    with pytest.raises(services.InsufficientSpace, match="Not enough free space"):
        start_download()
    assert not Download.objects.exists()


def test_it_fails_with_a_message_when_space_runs_out_before_the_transfer(firmware, monkeypatch):
    firmware.offer(firmware.build())
    download = start_download()
    monkeypatch.setattr(spool, "free_bytes", lambda root=None: 1024)

    assert downloader.download_execute(download.pk) == DownloadState.FAILED
    download.refresh_from_db()
    assert "Not enough free space in var/spool/updates" in download.error
    assert firmware.server.downloads_of("lmi-firmware-2.8.1.0.bundle") == []


def test_a_full_disk_fails_with_a_message_and_keeps_the_part_to_resume(firmware):
    import errno

    path = firmware.build(payload_bytes=3 * 1024 * 1024)
    firmware.offer(path)
    firmware.server.rate = 3 * 1024 * 1024

    def disk_fills_up(download: Download) -> None:
        if download.bytes_done > download.size // 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    download = run_download(on_progress=disk_fills_up)

    assert download.state == DownloadState.FAILED
    assert "the disk holding var/spool/updates is full" in download.error
    assert spool.part_size(offered_bundle()) > 0
