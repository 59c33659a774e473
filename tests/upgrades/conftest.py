"""Fixtures of the update tests: a trusted vendor key, a license, bundles served over loopback.

A real worker started here gets the test's trusted keys and feed (tests/support/services.py
hands them over), so it trusts the same vendor key as the test process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.firmware import license as appliance_license
from appliance.firmware import spool
from appliance.firmware.demo_feed import init_demo_updates
from jobs.models import Job
from jobs.tasks import run_job
from tests.support.feed_server import FeedServer, feed_server  # noqa: F401
from tests.support.services import WorkerProcess, start_worker
from tests.support.smtp import SmtpServiceProcess, smtp_service  # noqa: F401
from tests.upgrades import bundles
from tests.upgrades.bundles import Vendor
from upgrades import cli, downloader, rehearsal, services
from upgrades.models import Download, DownloadState, DownloadTrigger, FirmwareOffer, InstallRun


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries back off in milliseconds here, not seconds (tests/conftest.py already gives
    every test its own trusted keys, feed and var/)."""
    monkeypatch.setattr(downloader, "BACKOFF_BASE", 0.05)


@pytest.fixture
def vendor(settings) -> Vendor:
    """The vendor's signing key, trusted by this console (and by the workers it starts)."""
    key = bundles.new_vendor()
    settings.TRUSTED_KEYS = [key.public_b64]
    return key


def issue_license(vendor: Vendor, *, days: int = 365, serial: str = "KQ7R2M4") -> bytes:
    return appliance_license.sign_license(
        vendor.private,
        customer="Example Corp",
        serial=serial,
        updates_until=date.today() + timedelta(days=days),
    )


@pytest.fixture
def licensed(demo_appliance: Path, vendor: Vendor) -> appliance_license.License:
    """A valid license with a year of update entitlement, installed on the demo appliance."""
    return appliance_license.install_license(issue_license(vendor))


@dataclass
class Firmware:
    """Bundles in the served directory and the feed listing them."""

    server: FeedServer
    vendor: Vendor

    @property
    def directory(self) -> Path:
        return self.server.directory

    def build(self, version: str = "2.8.1.0", min_version: str = "2.8.0.0", **kw) -> Path:
        name = f"lmi-firmware-{version}.bundle"
        return bundles.build(
            self.vendor, self.directory / name, version=version, min_version=min_version, **kw
        )

    def publish(self, *entries: tuple[Path, str, str]) -> Path:
        return bundles.write_feed(self.directory, *entries)

    def offer(self, path: Path, version: str = "2.8.1.0", min_version: str = "2.8.0.0") -> None:
        """List just this bundle and check the feed, as "Check now" would."""
        self.publish((path, version, min_version))
        check = services.update_check(trigger="user", user="admin")
        assert check.ok, check.error


@pytest.fixture
def firmware(feed_server: FeedServer, vendor: Vendor, settings, licensed) -> Firmware:  # noqa: F811
    """A licensed demo appliance (2.8.0.0) whose feed is served over HTTP on 127.0.0.1."""
    settings.UPDATE_FEED_URL = feed_server.base_url
    return Firmware(feed_server, vendor)


@pytest.fixture
def cli_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """update-control's main() called in this process, where Django is already set up (the real
    set-up runs in the subprocess tests)."""
    monkeypatch.setattr(cli, "setup_django", lambda: None)


def update_control(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """update-control ``args`` run in this process: its exit code, stdout and stderr."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def offered_bundle(version: str = "2.8.1.0") -> str:
    """The spool's name for the bundle the feed offers as ``version``."""
    offer = FirmwareOffer.objects.filter(version=version).first()
    assert offer is not None, f"the feed offers no {version}"
    return spool.bundle_id(offer.version, offer.sha256)


def install_run_row(
    state: str, phase: int, *, download: Download | None = None, **fields: Any
) -> InstallRun:
    """An install from 2.8.0.0 to 2.8.1.0 recorded in ``state`` at ``phase``, of ``download`` or
    of a download recorded as ready with no bundle behind it: rows only, for the tests of what
    the pages and reports show about a run (nothing is installed)."""
    if download is None:
        download = Download.objects.create(
            version="2.8.1.0",
            url="http://127.0.0.1/x.bundle",
            size=1,
            sha256="0" * 64,
            state=DownloadState.READY,
            trigger=DownloadTrigger.USER,
        )
    return InstallRun.objects.create(
        download=download,
        version="2.8.1.0",
        from_version="2.8.0.0",
        state=state,
        phase=phase,
        **fields,
    )


def start_download(version: str | None = None, user: str = "admin") -> Download:
    return services.download_start(
        user=user, trigger=DownloadTrigger.USER, version=version, enqueue=False
    )


def run_download(version: str | None = None, **kwargs) -> Download:
    """Start and run a download in this process, as update-control -d fw does."""
    download = start_download(version)
    downloader.download_execute(download.pk, **kwargs)
    download.refresh_from_db()
    return download


@pytest.fixture
def ready(firmware: Firmware) -> Download:
    """A licensed demo appliance (2.8.0.0) with firmware 2.8.1.0 downloaded and verified."""
    firmware.offer(firmware.build())
    download = run_download()
    assert download.state == DownloadState.READY, download.error
    return download


def rehearse_here() -> Job:
    """A rehearsal started as the console starts one, run as the worker runs it."""
    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    run_job(job.pk)
    job.refresh_from_db()
    return job


@pytest.fixture
def workers(
    transactional_db: None,
    vendor: Vendor,
    install_workers: Callable[..., WorkerProcess],  # last: its workers stop before the rest
) -> Callable[[], WorkerProcess]:
    """Start real Celery workers (after the vendor key is in their environment)."""
    return install_workers


@pytest.fixture
def ready_firmware(
    demo_appliance: Path, transactional_db: None, settings, redis_settings: str
) -> Download:
    """The demo vendor's 2.8.1.0 bundle downloaded and verified, a license installed."""
    init_demo_updates(Path(settings.VAR_DIR), demo_appliance, out=open(os.devnull, "w"))  # noqa: SIM115
    check = services.update_check(trigger="user", user="admin")
    assert check.ok, check.error
    download = services.download_start(user="admin", trigger="user", enqueue=False)
    downloader.download_execute(download.pk)
    download.refresh_from_db()
    assert download.state == DownloadState.READY, download.error
    return download


@pytest.fixture
def install_workers(
    redis_settings: str, appliance_root: Path, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real workers with extra LMI_* settings (phase delay, lease, SMTP port)."""
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            worker = start_worker(redis_settings, appliance_root, tmp_path)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def workers_on_mail(
    smtp_service: SmtpServiceProcess,  # noqa: F811 - before the workers: stopped after them
    install_workers: Callable[..., WorkerProcess],
) -> Callable[..., WorkerProcess]:
    """Start real workers whose installs probe the test's mail service (LMI_SMTP_PORT), with
    any further LMI_* settings: what every install on live mail starts its workers with."""

    def start(**env: str) -> WorkerProcess:
        return install_workers(LMI_SMTP_PORT=str(smtp_service.port), **env)

    return start


@pytest.fixture
def worker_paused_at(workers_on_mail: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    """Start a worker on the test's mail service that holds ``phase`` at its checkpoint for
    ``ms`` milliseconds (LMI_INSTALL_PHASE_DELAY_*): the test acts while the run sits there."""

    def start(*, phase: int, ms: int) -> WorkerProcess:
        return workers_on_mail(
            LMI_INSTALL_PHASE_DELAY_MS=str(ms), LMI_INSTALL_PHASE_DELAY_PHASE=str(phase)
        )

    return start
