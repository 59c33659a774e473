"""Downloads in a real Celery worker against a real Redis: finish, survive a SIGKILL, resume.

The bundle is served by a throttled loopback server so the worker is caught mid-transfer; the
worker is killed with SIGKILL (main process and pool child, as a crash would), a new worker is
started, and the download must resume from its part file with a Range request and end
verified, exactly once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.firmware import spool
from events.models import Event
from jobs.models import JobState
from lmi.celery import app as celery_app
from tests.support.services import WorkerProcess, wait_for
from tests.upgrades.conftest import offered_bundle
from upgrades import downloader, services
from upgrades.models import Download, DownloadState, DownloadTrigger

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUNDLE = "lmi-firmware-2.8.1.0.bundle"
# The reconciler at the new worker's start sees the killed one's process gone at once; a lease
# that must lapse (another host) takes LEASE_SECONDS.
RESUME_TIMEOUT = downloader.LEASE_SECONDS + 60


def _start(user: str = "admin") -> Download:
    return services.download_start(user=user, trigger=DownloadTrigger.USER)


def _download() -> Download:
    return Download.objects.get()


def _killed_mid_transfer(workers, firmware) -> tuple[Path, WorkerProcess, int]:
    """A 6 MiB bundle offered at 1 MiB/s, its download started in a worker and that worker
    SIGKILLed well into the transfer: the bundle, the dead worker and the bytes it got."""
    path = firmware.build(payload_bytes=6 * 1024 * 1024)
    size = path.stat().st_size
    firmware.offer(path)
    firmware.server.rate = 1024 * 1024
    worker = workers()
    _start()
    wait_for(
        lambda: _download().bytes_done > size // 4,
        timeout=60,
        message=f"the worker did not get going; its log:\n{worker.log()}",
    )
    worker.kill()
    kept = spool.part_size(offered_bundle())
    assert 0 < kept < size
    assert _download().state == DownloadState.RUNNING
    firmware.server.rate = None  # the rest at full speed
    return path, worker, kept


def _assert_resumed_and_verified(firmware, path, kept: int, worker) -> Download:
    download = wait_for(
        lambda: (
            (d := _download()).state
            not in (DownloadState.QUEUED, DownloadState.RUNNING, DownloadState.VERIFYING)
            and d
        ),
        timeout=RESUME_TIMEOUT,
        message=f"the download did not finish; the new worker's log:\n{worker.log()}",
    )
    assert download.state == DownloadState.READY, download.error
    assert spool.bundle_path(offered_bundle()).read_bytes() == path.read_bytes()
    assert not spool.part_path(offered_bundle()).exists()
    resumed = [t for t in firmware.server.downloads_of(BUNDLE) if t.status == 206]
    assert resumed, firmware.server.requests
    assert resumed[0].start >= kept - downloader.CHUNK  # it went on from the part file, not byte 0
    assert download.resumes >= 1
    assert Event.objects.filter(message__startswith="Download of firmware 2.8.1.0 resumed").exists()
    assert Event.objects.filter(message="Firmware 2.8.1.0 is ready to install").count() == 1
    return download


def test_the_worker_downloads_and_verifies_a_bundle(workers, firmware):
    path = firmware.build()
    firmware.offer(path)
    worker = workers()

    _start()

    download = wait_for(
        lambda: (d := _download()).state == DownloadState.READY and d,
        timeout=60,
        message=f"not ready; the worker's log:\n{worker.log()}",
    )
    assert download.job.state == JobState.SUCCEEDED and not download.job.lease_owner
    assert spool.bundle_path(offered_bundle()).read_bytes() == path.read_bytes()


def test_a_download_resumes_in_a_new_worker_after_the_old_one_is_killed(workers, firmware):
    path, _, kept = _killed_mid_transfer(workers, firmware)
    second = workers()

    _assert_resumed_and_verified(firmware, path, kept, second)


def _redeliver_unacked() -> int:
    """What Redis does once the visibility timeout passes: unacked messages go back in the queue."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        tags = client.hkeys(channel.unacked_key)
        for tag in tags:
            channel.qos.restore_by_tag(tag, client)
    return len(tags)


def test_the_redelivered_task_of_a_killed_worker_resumes_the_same_download(workers, firmware):
    path, first, kept = _killed_mid_transfer(workers, firmware)
    [task_id] = re.findall(r"jobs\.run\[([0-9a-f-]+)\] received", first.log())
    assert _redeliver_unacked() == 1  # acks_late: the killed worker never acknowledged it
    second = workers()

    _assert_resumed_and_verified(firmware, path, kept, second)
    # The same task ran again in the new worker; with the reconciler at start-up it may run
    # twice, and the job's lease lets exactly one of them do the work.
    wait_for(lambda: f"jobs.run[{task_id}] succeeded" in second.log(), timeout=RESUME_TIMEOUT)


def test_a_starting_worker_checks_the_feed_when_the_last_check_is_overdue(workers, firmware):
    from upgrades.models import UpdateCheck

    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))
    worker = workers()

    check = wait_for(
        lambda: UpdateCheck.objects.filter(ok=True).first(),
        timeout=30,
        message=f"no check at start-up; the worker's log:\n{worker.log()}",
    )
    assert check.trigger == "schedule"
    assert check.newest_available == "2.8.1.0"
