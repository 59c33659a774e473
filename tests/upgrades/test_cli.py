"""update-control: --check, -d fw, -s [--json], -i fw, and its exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from appliance.firmware import spool
from events.models import Event
from tests.support import services as support
from tests.support.services import wait_for
from tests.upgrades.conftest import offered_bundle, start_download, update_control
from upgrades.models import Download, DownloadState

pytestmark = pytest.mark.usefixtures("cli_in_this_process")

UPDATE_CONTROL = Path(sys.executable).parent / "update-control"


@pytest.mark.django_db
def test_check_exits_0_when_newer_firmware_is_available(firmware, capsys):
    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))

    assert update_control(capsys, "--check")[:2] == (0, "Firmware 2.8.1.0 is available.\n")


@pytest.mark.django_db
def test_check_exits_3_when_there_is_nothing_newer(firmware, capsys):
    old = firmware.build("2.8.0.0", "2.7.0.0", payload_bytes=4096)
    firmware.publish((old, "2.8.0.0", "2.7.0.0"))

    code, out, _ = update_control(capsys, "--check")

    assert code == 3
    assert "No newer firmware is available (installed: 2.8.0.0)" in out


@pytest.mark.django_db
def test_check_exits_1_when_the_feed_is_unreachable(demo_appliance, settings, tmp_path, capsys):
    settings.UPDATE_FEED_URL = str(tmp_path / "nothing")

    code, _, err = update_control(capsys, "--check")

    assert code == 1
    assert "The update feed is unreachable" in err
    assert Event.objects.filter(message__startswith="Checking for firmware updates failed").exists()


@pytest.mark.django_db
def test_download_shows_progress_and_then_has_nothing_to_do(firmware, capsys):
    firmware.publish((firmware.build(payload_bytes=3 * 1024 * 1024), "2.8.1.0", "2.8.0.0"))
    firmware.server.rate = 3 * 1024 * 1024

    code, out, err = update_control(capsys, "-d", "fw")

    assert code == 0, err
    assert out.splitlines()[-1] == "Firmware 2.8.1.0 is ready to install."
    lines = [line for line in err.splitlines() if line.startswith("Downloading 2.8.1.0")]
    assert len(lines) >= 3  # one per 10% step on a non-terminal
    assert "100.0%" in lines[-1]
    assert "MB/s" in err and "ETA" in err
    download = Download.objects.get()
    assert download.state == DownloadState.READY
    assert download.trigger == "cli"
    assert download.requested_by.endswith("(update-control)")

    again = update_control(capsys, "-d", "fw")
    assert again[0] == 3
    assert "already downloaded and ready to install" in again[1]


@pytest.mark.django_db
def test_download_fails_while_another_download_runs(firmware, capsys):
    firmware.offer(firmware.build())
    start_download()

    code, _, err = update_control(capsys, "-d", "fw")

    assert code == 1
    assert "already in progress" in err


@pytest.mark.django_db
def test_download_of_a_rejected_bundle_fails_with_the_reason(firmware, capsys):
    from tests.upgrades import bundles

    path = firmware.build()
    bundles.unsign(path)
    firmware.publish((path, "2.8.1.0", "2.8.0.0"))

    code, _, err = update_control(capsys, "-d", "fw", "-q")

    assert code == 1
    assert "not signed" in err


@pytest.mark.django_db
def test_status_as_json_for_scripts(firmware, capsys):
    firmware.offer(firmware.build())

    code, out, _ = update_control(capsys, "-s", "--json")

    status = json.loads(out)
    assert code == 0
    assert status["installed_version"] == "2.8.0.0"
    assert status["offers"][0]["version"] == "2.8.1.0"
    assert status["license"]["entitled"] is True


@pytest.mark.django_db
def test_status_for_people(firmware, capsys):
    firmware.offer(firmware.build())

    code, out, _ = update_control(capsys, "-s")

    assert code == 0
    assert "Installed firmware:   2.8.0.0" in out
    assert "2.8.1.0" in out and "newer than the installed firmware" in out
    assert "Example Corp" in out


@pytest.mark.parametrize("args", [[], ["-d", "db"], ["--json"], ["-s", "--check"], ["--bogus"]])
def test_usage_errors_exit_2(capsys, args):
    assert update_control(capsys, *args)[0] == 2


# --- The installed console script, as an administrator runs it -------------------------------


def _env(appliance_root: Path, feed_url: str) -> dict[str, str]:
    """What an administrator's shell on the appliance has: the console's LMI_* settings."""
    env = dict(os.environ)
    env.update(
        {
            "LMI_DATABASE_URL": support.test_database_url(),
            "LMI_APPLIANCE_ROOT": str(appliance_root),
            "LMI_UPDATE_FEED_URL": feed_url,
            "LMI_TRUSTED_KEYS": ",".join(settings.TRUSTED_KEYS),
            "LMI_TRUSTED_KEYS_DIR": str(settings.TRUSTED_KEYS_DIR),
            "LMI_VAR_DIR": str(settings.VAR_DIR),
        }
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


@pytest.mark.slow
def test_the_console_script_reports_status_from_any_directory(
    transactional_db, firmware, appliance_root, tmp_path
):
    firmware.offer(firmware.build())

    result = subprocess.run(
        [str(UPDATE_CONTROL), "-s", "--json"],
        cwd=tmp_path,
        env=_env(appliance_root, firmware.server.base_url),
        capture_output=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["offers"][0]["version"] == "2.8.1.0"


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_status_quietly(
    transactional_db, firmware, appliance_root, tmp_path
):
    """`update-control -s | head -3`: head exits, the next write meets a closed pipe. The
    status ends without a traceback on the terminal (it printed one)."""
    firmware.offer(firmware.build())
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails
    try:
        result = subprocess.run(
            [str(UPDATE_CONTROL), "-s"],
            cwd=tmp_path,
            env=_env(appliance_root, firmware.server.base_url),
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)

    assert result.returncode == 1
    assert result.stderr.decode() == ""


@pytest.mark.slow
def test_ctrl_c_cancels_the_download_cleanly(transactional_db, firmware, appliance_root, tmp_path):
    firmware.publish((firmware.build(payload_bytes=4 * 1024 * 1024), "2.8.1.0", "2.8.0.0"))
    firmware.server.rate = 512 * 1024  # about 8 s for the whole bundle

    process = subprocess.Popen(
        [str(UPDATE_CONTROL), "-d", "fw"],
        cwd=tmp_path,
        env=_env(appliance_root, firmware.server.base_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: Download.objects.filter(state=DownloadState.RUNNING, bytes_done__gt=0).exists(),
            timeout=30,
        )
        assert spool.part_path(offered_bundle()).exists()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 1, err.decode()
    assert "was cancelled" in err.decode()
    download = Download.objects.get()
    assert download.state == DownloadState.CANCELLED
    assert not spool.part_path(offered_bundle()).exists()
    event = Event.objects.get(message__contains="cancelled at")
    assert event.username.endswith("(update-control)")
