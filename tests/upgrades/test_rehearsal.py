"""The install rehearsal (issue 18): the conversion on a snapshot, the live appliance untouched.

The demo appliance (2.8.0.0) gets the demo vendor's real 2.8.1.0 bundle through the feed and the
download code (test_install.ready_firmware); the rehearsal job then runs as the worker runs it
(jobs.tasks.run_job), or in a real worker for update-control. What is proven: the live root is
byte-identical afterwards (every file's bytes, name and mode: tests/support/trees.py), the
scratch folder is gone, and the report holds the figures, the warnings and the diff.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from appliance.config import configconvert
from appliance.mail import msgstore
from appliance.system import snapshot
from events.models import Event
from jobs.models import Job, JobState
from jobs.reconciler import reconcile
from tests.support.jobs import appliance_job_running
from tests.support.services import start_worker, worker_env
from tests.support.trees import tree_snapshot
from tests.upgrades.conftest import rehearse_here, update_control
from upgrades import install, rehearsal
from upgrades.models import Download

LISTS = "etc/mailsec/lists"
OBJECTS = "etc/mailsec/cpe/mailsec_policyobjects1_1.xml"


def add_object(root: Path, *, unknown: bool = False) -> None:
    """A $(FILE) object whose file is missing (and, with ``unknown``, an element 2.8.1 does not
    know) in the 2.8.0 policy objects file, one element per line as the appliance writes it."""
    path = root / OBJECTS
    text = path.read_text(encoding="utf-8")
    value = base64.b64encode(b"$(FILE/etc/mailsec/lists/partners.txt)").decode()
    extra = (
        '  <object id="po-missing" type="emailaddresslist">\n'
        "    <name>Partner senders</name>\n"
        f"    <value>{value}</value>\n"
        + ("    <owner>mailadmin</owner>\n" if unknown else "")
        + "  </object>\n"
    )
    path.write_text(text.replace("</policyobjects>", extra + "</policyobjects>"), "utf-8")


def test_a_rehearsal_leaves_the_live_tree_byte_identical_and_reports_its_figures(
    ready_firmware: Download,
    appliance_root: Path,
) -> None:
    before = tree_snapshot(appliance_root)
    messages = msgstore.totals().messages

    job = rehearse_here()

    assert job.state == JobState.SUCCEEDED, job.error
    assert tree_snapshot(appliance_root) == before  # bytes, names, modes, link targets
    assert not snapshot.scratch_path().exists()
    assert configconvert.config_format() == "2.8.0" and msgstore.format_version() == "2.8.0"
    report = job.details["report"]
    assert report["version"] == "2.8.1.0" and report["messages"] == messages
    assert report["snapshot"]["method"] == "hardlink" and report["snapshot"]["linked"] > 0
    assert set(report["timings"]["window"]) == {"3", "4", "5", "6", "7", "8", "9"}
    assert report["chunks_marked"] == 4  # the mail of phase 2's last moments, one per table
    assert report["downtime_s"] == pytest.approx(
        report["timings"]["downtime_work_s"] + report["unmeasured_downtime_s"]
    )
    assert report["estimate_s"] > 0 and report["conversion_s"] > 0
    # The demo's three $(FILE) lists are carried over, and said so.
    assert len(report["converted"]["files_carried"]) == 3
    assert {w["kind"] for w in report["warnings"]} == {"file"}
    # The configuration files change format; nothing the configuration says changes.
    assert {item["section"] for item in report["diff"]} == {"Configuration files"}
    assert {i["name"]: i["change"] for i in report["diff"]}["mailsec_config2_0.xml"] == "added"
    assert Event.objects.filter(
        message__startswith="Rehearsal of firmware 2.8.1.0: about", details__job=job.pk
    ).exists()


def test_the_report_names_file_objects_and_warns_of_a_missing_file(
    ready_firmware: Download,
    appliance_root: Path,
) -> None:
    add_object(appliance_root)
    before = tree_snapshot(appliance_root)

    job = rehearse_here()

    assert job.state == JobState.SUCCEEDED, job.error
    assert tree_snapshot(appliance_root) == before
    report = job.details["report"]
    warned = [w for w in report["warnings"] if w["level"] == "warn"]
    assert [(w["kind"], w["subject"]) for w in warned] == [("file", "Partner senders")]
    assert "partners.txt" in warned[0]["message"] and "does not exist" in warned[0]["message"]
    assert report["converted"]["files_missing"] == ["/etc/mailsec/lists/partners.txt"]
    found = {w["subject"] for w in report["warnings"] if w["kind"] == "file"}
    assert found == {
        "Blocked senders",
        "Allowed domains",
        "Confidential keywords",
        "Partner senders",
    }


def test_an_element_2_8_1_does_not_know_fails_the_rehearsal_as_it_would_fail_the_install(
    ready_firmware: Download,
    appliance_root: Path,
) -> None:
    """Phase 5 reads the configuration backup back and refuses a foreign element (the install
    would roll back there): the rehearsal meets it on the snapshot and says so, with every
    warning found before."""
    add_object(appliance_root, unknown=True)
    before = tree_snapshot(appliance_root)

    job = rehearse_here()

    assert job.state == JobState.FAILED
    assert job.error.startswith("The install would fail in phase 5 (reading the configuration")
    assert "<owner>" in job.error
    assert tree_snapshot(appliance_root) == before
    assert not snapshot.scratch_path().exists()
    report = job.details["report"]
    assert report["failed_step"] == "phase 5"
    warned = [(w["kind"], w["subject"]) for w in report["warnings"] if w["level"] == "warn"]
    assert warned == [("unknown", "Partner senders"), ("file", "Partner senders")]


def test_a_rehearsal_is_refused_while_an_install_runs_and_an_install_while_it_runs(
    ready_firmware: Download,
) -> None:
    running = appliance_job_running("install", "Install of firmware 2.8.1.0")
    with pytest.raises(rehearsal.RehearsalError, match=r"Install of firmware 2\.8\.1\.0 is in"):
        rehearsal.rehearsal_start(user="admin", enqueue=False)
    running.delete()

    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    with pytest.raises(install.InstallInProgress, match="Rehearsal of the install"):
        install.install_start(user="admin")
    with pytest.raises(rehearsal.RehearsalError, match="Rehearsal of the install"):
        rehearsal.rehearsal_start(user="admin", enqueue=False)
    assert Job.objects.filter(kind=rehearsal.REHEARSE_KIND).count() == 1
    assert job.conflict_group == "appliance"


@pytest.mark.integration
def test_a_rehearsal_killed_midway_leaves_the_live_root_and_recovery_removes_its_scratch(
    ready_firmware: Download,
    redis_settings: str,
    appliance_root: Path,
) -> None:
    from tests.support.crash import killed_at_step

    before = tree_snapshot(appliance_root)
    job = killed_at_step(
        "from jobs.tasks import run_job\nfrom upgrades import rehearsal\n"
        "run_job(rehearsal.rehearsal_start(user='admin', enqueue=False).pk)",
        worker_env(redis_settings, appliance_root),
        rehearsal.REHEARSE_KIND,
        2,  # the new system is in the snapshot's slot, the store copy starts
    )
    scratch = snapshot.scratch_path()
    assert (scratch / "system").is_dir()  # the kill left the scratch folder behind

    done = reconcile()

    assert done.failed == [job.pk]
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "stopped" in job.error
    assert not scratch.exists()
    assert tree_snapshot(appliance_root) == before
    assert rehearse_here().state == JobState.SUCCEEDED  # the way is free again


@pytest.mark.integration
def test_update_control_rehearse_waits_for_the_worker_and_prints_the_figures(
    ready_firmware: Download,
    redis_settings: str,
    appliance_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli_in_this_process: None,
) -> None:
    before = tree_snapshot(appliance_root)
    worker = start_worker(redis_settings, appliance_root, tmp_path)
    try:
        code, out, err = update_control(capsys, "--rehearse", "--json")
        assert code == 0, err
        data = json.loads(out)
        assert data["kind"] == "rehearse" and data["state"] == "succeeded"
        assert data["report"]["downtime_s"] > 0
        assert data["report"]["warnings"]

        code, out, err = update_control(capsys, "--rehearse")
    finally:
        worker.stop()
    assert code == 0, err
    assert "Mail held by the install: about" in out and "Conversion:" in out
    assert tree_snapshot(appliance_root) == before
