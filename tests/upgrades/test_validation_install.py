"""The validation report after a real install: a real worker, Redis and mail service.

A successful install always leaves a report whose checks pass (its virus test message
quarantined in the new store and deleted again); data removed behind the install's back (a
message deleted from the new store and a $(FILE) list removed, while phase 10 sits at its
checkpoint after the commit) makes those checks fail, without undoing the commit: an error
event and a notice on Home say so.
"""

from __future__ import annotations

import pytest

from appliance.config.policy import object_file
from appliance.config.store import file_macro_objects
from appliance.firmware import validationfile
from appliance.mail import msgstore, quarantine
from events.models import Event, Severity
from tests.support.smtp import SmtpServiceProcess, smtp_service  # noqa: F401
from tests.upgrades.test_install import (  # noqa: F401 - fixtures
    assert_upgraded,
    roomy_preflight_disk,
    wait_final,
    wait_for_checkpoint,
)
from upgrades import install, validation
from upgrades.models import Download, InstallState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_successful_install_writes_a_report_whose_checks_all_pass(
    ready_firmware: Download,
    workers_on_mail,
    admin_user,
) -> None:
    from appliance.mail import msgcounts

    workers_on_mail()
    before = msgcounts.store_counts()
    run = wait_final(install.install_start(user=admin_user).pk)
    assert_upgraded(run, before)  # the report's session changed nothing the install checks
    report = validationfile.report_read(run.pk)
    assert report is not None and report["run"] == run.pk
    failed = {c["key"]: c["summary"] for c in report["checks"] if not c["passed"]}
    assert failed == {}
    assert [c["key"] for c in report["checks"]] == [
        "messages",
        "policy",
        "smtp",
        "services",
        "downtime",
    ]
    messages = report["checks"][0]["figures"]
    assert messages["messages_before"] == messages["messages_after"] == run.messages_before
    assert (messages["format_before"], messages["format_after"]) == ("2.8.0", "2.8.1")
    assert report["checks"][1]["figures"]["files_read"] > 0
    # The virus test message went through the running service into the converted store, and
    # out of it again (assert_upgraded: every message as before).
    quarantine = report["checks"][2]["figures"]["quarantine"]
    assert quarantine["quarantined"] and quarantine["removed"], quarantine
    assert (quarantine["store_format"], quarantine["removed_earlier"]) == ("2.8.1", 0)
    assert (
        f"quarantined in {quarantine['store']} and deleted again" in report["checks"][2]["summary"]
    )
    assert report["checks"][4]["figures"]["seconds"] >= 0
    assert run.details[validation.SUMMARY]["passed"] is True
    assert Event.objects.filter(message__contains="all 5 checks passed").count() == 1
    assert validation.validation_notice() is None


def test_data_removed_behind_the_installs_back_fails_the_report_but_not_the_commit(
    ready_firmware: Download,
    worker_paused_at,
    admin_user,
) -> None:
    worker_paused_at(phase=10, ms=4000)
    run = install.install_start(user=admin_user)
    wait_for_checkpoint(run, 10, timeout=120)
    # Committed and mail accepted again: one message and one list go missing now.
    assert msgstore.format_version() == "2.8.1"
    quarantine.quarantine_delete([42])
    listed = file_macro_objects()[0]
    object_file(listed).unlink()
    run = wait_final(run.pk)
    assert run.state == InstallState.SUCCEEDED, run.error
    report = validationfile.report_read(run.pk)
    assert report is not None and report["passed"] is False
    checks = {c["key"]: c for c in report["checks"]}
    assert not checks["messages"]["passed"]
    assert "content checksum differs" in checks["messages"]["summary"]
    assert not checks["policy"]["passed"] and listed.name in checks["policy"]["summary"]
    # Without its list the mail policy cannot be compiled: the service answers 4xx, and the
    # report says so rather than passing the mail check.
    assert not checks["smtp"]["passed"] and "cannot be read" in checks["smtp"]["summary"]
    assert checks["services"]["passed"] and checks["downtime"]["passed"], report
    assert run.details[validation.SUMMARY]["failed"] == ["messages", "policy", "smtp"]
    event = Event.objects.get(message__contains="3 of 5 checks failed")
    assert event.severity == Severity.ERROR
    notice = validation.validation_notice()
    assert notice is not None and "messages per message store" in notice.message
