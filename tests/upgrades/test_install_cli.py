"""update-control --preflight and -i fw: the checklist, the phase display, the exit codes, and
a whole install driven from the shell through a real worker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from appliance.system import system_info
from tests.support.services import start_worker
from tests.support.smtp import smtp_service  # noqa: F401
from tests.upgrades.conftest import run_download
from tests.upgrades.test_install_views import make_run, roomy_disks  # noqa: F401
from upgrades import cli, services
from upgrades.models import Download, InstallRun, InstallState


@pytest.fixture(autouse=True)
def django_is_set_up(monkeypatch):
    """In this process Django is already set up."""
    monkeypatch.setattr(cli, "setup_django", lambda: None)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def download_demo_281() -> Download:
    """The demo vendor's real 2.8.1.0 bundle (a whole system image), listed in this test's feed,
    trusted, licensed, downloaded and verified: what ``make run`` offers to install."""
    from appliance.demo_updates import init_demo_updates

    init_demo_updates(Path(django_settings.VAR_DIR), out=io.StringIO())
    check = services.update_check(trigger="user", user="admin")
    assert check.ok, check.error
    download = run_download("2.8.1.0")
    assert download.state == "ready", download.error
    return download


@pytest.fixture
def ready(firmware):
    firmware.offer(firmware.build())
    download = run_download()
    assert download.state == "ready", download.error
    return download


@pytest.mark.django_db
def test_preflight_prints_the_checklist_and_exits_0_when_nothing_fails(ready, capsys):
    code, out, err = run(capsys, "--preflight")

    assert code == 0, out + err
    assert "[PASS] " in out and "[WARN] " in out
    assert "eth0" in out  # the DHCP warning names the interface
    assert out.rstrip().endswith("Every check passed: the firmware can be installed.")


@pytest.mark.django_db
def test_preflight_fails_with_exit_4_and_the_reason(demo_appliance, capsys):
    code, out, err = run(capsys, "--preflight")

    assert code == cli.EXIT_PREFLIGHT_FAILED == 4
    assert "[FAIL] " in out
    assert "the install is not possible" in err


@pytest.mark.django_db
def test_preflight_as_json_for_scripts(demo_appliance, capsys):
    code, out, _ = run(capsys, "--preflight", "--json")

    body = json.loads(out)
    assert code == 4 and body["ok"] is False
    assert any(check["status"] == "fail" for check in body["checks"])
    assert {"key", "title", "status", "value", "advice", "details"} <= set(body["checks"][0])


@pytest.mark.django_db
def test_install_with_a_failed_check_exits_4_and_changes_nothing(demo_appliance, capsys):
    code, out, err = run(capsys, "-i", "fw")

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

    code, out, _ = run(capsys, "-s", "--json")
    assert code == 0
    install = json.loads(out)["install"]
    assert install["id"] == the_run.pk and install["phase"] == 4 and install["active"] is True
    assert len(install["phases"]) == 10

    code, out, _ = run(capsys, "-s")
    assert "firmware 2.8.1.0 installing, phase 4/10" in out


# --- A whole install from the shell, through a real worker --------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_install_runs_all_ten_phases_to_success_from_the_shell(
    transactional_db,
    smtp_service,  # noqa: F811
    redis_settings,
    demo_appliance: Path,
    tmp_path: Path,
    monkeypatch,
    settings,
    capsys,
):
    download_demo_281()
    # The worker's health check talks to this test's SMTP service.
    monkeypatch.setenv("LMI_SMTP_PORT", str(smtp_service.port))
    settings.SMTP_PORT = smtp_service.port
    worker = start_worker(redis_settings, demo_appliance, tmp_path)
    try:
        code, out, err = run(capsys, "-i", "fw")
    finally:
        worker.stop()

    assert code == 0, out + err + worker.log()[-4000:]
    for number in range(1, 11):
        assert f"Phase {number:>2}/10 " in out, number
    assert "Upgrade complete: firmware 2.8.1.0" in out
    assert system_info().firmware_version == "2.8.1.0"
    assert InstallRun.objects.get().trigger == "cli"
