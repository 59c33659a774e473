"""update-control --preflight and -i fw: the checklist, the phase display, the exit codes, and
a whole install driven from the shell through a real worker."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from appliance.system.facts import system_info
from tests.support.services import WorkerProcess, start_worker
from tests.support.smtp import smtp_service  # noqa: F401
from tests.upgrades.conftest import run_download, update_control
from tests.upgrades.test_install_views import make_run, roomy_disks  # noqa: F401
from upgrades import cli, services
from upgrades.models import Download, InstallRun, InstallState

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


def download_demo_281() -> Download:
    """The demo vendor's real 2.8.1.0 bundle (a whole system image), listed in this test's feed,
    trusted, licensed, downloaded and verified: what ``make run`` offers to install."""
    from appliance.firmware.demo_feed import init_demo_updates

    init_demo_updates(Path(django_settings.VAR_DIR), out=io.StringIO())
    check = services.update_check(trigger="user", user="admin")
    assert check.ok, check.error
    download = run_download("2.8.1.0")
    assert download.state == "ready", download.error
    return download


@pytest.fixture
def demo_281_worker(
    transactional_db,
    smtp_service,  # noqa: F811
    redis_settings: str,
    demo_appliance: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings,
) -> Callable[..., WorkerProcess]:
    """The demo's 2.8.1.0 ready to install (download_demo_281), and a function that starts a
    real worker, extra LMI_* settings given as keywords; the test stops it."""
    download_demo_281()
    # The worker's health check talks to this test's SMTP service.
    monkeypatch.setenv("LMI_SMTP_PORT", str(smtp_service.port))
    settings.SMTP_PORT = smtp_service.port

    def start(**env: str) -> WorkerProcess:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return start_worker(redis_settings, demo_appliance, tmp_path)

    return start


@pytest.mark.django_db
def test_preflight_prints_the_checklist_and_exits_0_when_nothing_fails(ready, capsys):
    code, out, err = update_control(capsys, "--preflight")

    assert code == 0, out + err
    assert "[PASS] " in out and "[WARN] " in out
    assert "eth0" in out  # the DHCP warning names the interface
    assert out.rstrip().endswith("Every check passed: the firmware can be installed.")


@pytest.fixture
def full_disks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every disk 10% free: the 50% rule fails whatever this machine's disk holds."""
    from types import SimpleNamespace

    from upgrades import install

    def usage(path: str) -> SimpleNamespace:
        return SimpleNamespace(total=100 * 2**30, used=90 * 2**30, free=10 * 2**30, percent=90.0)

    monkeypatch.setattr(install, "PREFLIGHT_DISK_USAGE", usage)


@pytest.mark.django_db
def test_preflight_before_any_download_runs_every_check_and_waits_on_the_bundle(
    demo_appliance, firmware, capsys
):
    """A plan that can be read at any time (pmg7to8): nothing stops after the bundle check."""
    firmware.offer(firmware.build())
    services.update_check(trigger="user", user="admin")
    _, out, _ = update_control(capsys, "--preflight", "--json")
    checks = {check["key"]: check for check in json.loads(out)["checks"]}
    assert checks["bundle"]["status"] == "pending"
    assert "not yet downloaded" in checks["bundle"]["value"]
    assert {"firmware", "disk-msgstore", "file-macros", "rescue", "downtime"} <= set(checks)
    assert checks["firmware"]["status"] == "pass"
    assert checks["file-macros"]["value"].startswith("3 ")


@pytest.mark.django_db
def test_preflight_fails_with_exit_4_and_the_reason(demo_appliance, full_disks, capsys):
    code, out, err = update_control(capsys, "--preflight")

    assert code == cli.EXIT_PREFLIGHT_FAILED == 4
    assert "[FAIL] " in out
    assert "the install is not possible" in err


@pytest.mark.django_db
def test_preflight_as_json_for_scripts(demo_appliance, full_disks, capsys):
    code, out, _ = update_control(capsys, "--preflight", "--json")

    body = json.loads(out)
    assert code == 4 and body["ok"] is False
    assert any(check["status"] == "fail" for check in body["checks"])
    assert {"key", "title", "status", "value", "advice", "details"} <= set(body["checks"][0])


@pytest.mark.django_db
def test_install_with_a_failed_check_exits_4_and_changes_nothing(ready, full_disks, capsys):
    code, out, err = update_control(capsys, "-i", "fw")

    assert code == 4
    assert "Preflight checks:" in out and "[FAIL] " in out
    assert "the install is not possible" in err
    assert not InstallRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("state", "code", "words"),
    [
        (InstallState.SUCCEEDED, 0, "Upgrade complete: firmware 2.8.1.0"),
        (InstallState.ROLLED_BACK, 5, "failed and was rolled back"),
        (InstallState.FAILED, 6, "could not be rolled back"),
        (InstallState.ABORTED, 7, "was aborted"),
    ],
)
def test_each_outcome_has_its_own_exit_code(demo_appliance, state, code, words):
    the_run = make_run(state, 10 if state == InstallState.SUCCEEDED else 7, error="disk on fire")
    out, err = io.StringIO(), io.StringIO()

    assert cli.follow_install(the_run.pk, out, err) == code
    assert words in out.getvalue() + err.getvalue()
    if code:
        assert "disk on fire" in err.getvalue()


@pytest.mark.django_db
def test_the_phase_display_writes_plain_lines_when_not_a_terminal(demo_appliance):
    the_run = make_run(InstallState.SUCCEEDED, 10)
    out = io.StringIO()

    cli.follow_install(the_run.pk, out, io.StringIO())

    lines = out.getvalue().splitlines()
    for number in range(1, 11):
        assert any(line.startswith(f"Phase {number:>2}/10 ") for line in lines), number
    assert "\x1b[" not in out.getvalue()


@pytest.mark.django_db
def test_the_phase_display_redraws_in_place_on_a_terminal(demo_appliance):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    the_run = make_run(InstallState.RUNNING, 4)
    screen = Terminal()
    display = cli.PhaseDisplay(screen)
    phases = list(the_run.phases.order_by("number"))

    display(the_run, phases)
    display(the_run, phases)

    assert screen.getvalue().count("\x1b[11F") == 1  # moved up over the 10 phases + status line
    assert "30.0% Running" in screen.getvalue()


@pytest.mark.django_db
def test_status_includes_the_install_run(demo_appliance, capsys):
    the_run = make_run(InstallState.RUNNING, 4)

    code, out, _ = update_control(capsys, "-s", "--json")
    assert code == 0
    install = json.loads(out)["install"]
    assert install["id"] == the_run.pk and install["phase"] == 4 and install["active"] is True
    assert len(install["phases"]) == 10

    code, out, _ = update_control(capsys, "-s")
    assert "firmware 2.8.1.0 installing, phase 4/10" in out


# --- A whole install from the shell, through a real worker --------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_install_runs_all_ten_phases_to_success_from_the_shell(
    demo_281_worker: Callable[..., WorkerProcess], capsys: pytest.CaptureFixture[str]
):
    worker = demo_281_worker()
    try:
        code, out, err = update_control(capsys, "-i", "fw")
    finally:
        worker.stop()

    assert code == 0, out + err + worker.log()[-4000:]
    for number in range(1, 11):
        assert f"Phase {number:>2}/10 " in out, number
    assert "Upgrade complete: firmware 2.8.1.0" in out
    assert system_info().firmware_version == "2.8.1.0"
    assert InstallRun.objects.get().trigger == "cli"
    # One story on every surface afterwards (issue 14): the shell, the API's JSON, Home, the
    # Install page; the bundle is consumed, and installing again is "nothing to do".
    assert_every_surface_says_installed(capsys, "2.8.1.0")


def assert_every_surface_says_installed(capsys, version: str) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    from appliance.config import configbackup
    from home.notifications import current_notices

    _, out, _ = update_control(capsys, "-s", "--json")
    status = json.loads(out)
    assert status["story"]["stage"] == "installed"
    assert status["story"]["ready_version"] is None
    assert status["ready"] is None
    assert status["download"]["state"] == "installed"
    _, out, _ = update_control(capsys, "-s")
    assert f"Status:               Up to date: firmware {version} installed on" in out
    assert "Ready to install:     nothing" in out
    assert f"firmware {version} installed\n" in out  # the download row: consumed

    runs = InstallRun.objects.count()
    code, out, _ = update_control(capsys, "-i", "fw")
    assert code == cli.EXIT_NOTHING_TO_DO == 3
    assert out.startswith(f"Nothing to install. Up to date: firmware {version} installed")
    assert InstallRun.objects.count() == runs

    update_notices = [n.message for n in current_notices() if "irmware" in n.message]
    assert update_notices == [f"Upgrade complete: firmware {version}."]

    admin = get_user_model().objects.create_superuser("surfaces", password="x" * 12)
    client = Client()
    client.force_login(admin)
    page = client.get("/updates/licensing/install/").content.decode()
    assert f"Up to date: firmware {version} installed on" in page
    assert 'data-testid="nothing-to-install"' in page
    assert 'data-status="fail"' not in page
    updates = client.get("/updates/licensing/").content.decode()
    assert f"Up to date: firmware {version} installed on" in updates
    assert 'data-testid="download-installed"' in updates
    api = client.get("/api/v1/updates").json()
    assert api["story"] == status["story"]

    pre_install = [h for h in configbackup.backup_list() if h.trigger == "pre-install"]
    assert len(pre_install) == 1, [h.name for h in pre_install]
