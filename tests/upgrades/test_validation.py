"""The validation report's comparisons on small real stores, and its pages.

The message proof must be the same for the same messages in either store format, and must
differ when a message is removed or altered; the policy proof must name an object or a
$(FILE) list that went missing. The full report after a real install is in
test_validation_install.py.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from django.utils import timezone

from appliance.config import policyproof
from appliance.config.policy import object_file
from appliance.config.store import file_macro_objects, list_policy_objects, write_policy_objects
from appliance.firmware import validationfile
from appliance.mail import msgbackup, msgmigrate, msgproof, msgstore, quarantine
from appliance.mail.mailrecords import mail_record
from appliance.system.paths import layout
from tests.support.message_store import quarantined_spam
from tests.upgrades.conftest import install_run_row, update_control
from upgrades import validation
from upgrades.models import InstallRun, InstallState


def _convert(root: Path) -> msgbackup.BackupResult:
    """Phases 2, 4 and 7 on the message store: the old file kept, the store now 2.8.1."""
    msgmigrate.migrate_prepare()
    kept = msgbackup.msgstore_backup(root / "kept" / "msgstore-backup.db")
    msgmigrate.migrate_finish()
    assert msgstore.format_version() == "2.8.1"
    return kept


def _quarantine(subject: str = "after the commit") -> int:
    raw = f"Subject: {subject}\r\n\r\nhello\r\n".encode()
    quarantine_id = mail_record(
        quarantined_spam(
            raw,
            logged_at=int(timezone.now().timestamp()),
            sender="someone@example.net",
            subject=subject,
            message_id="<new@example.net>",
        )
    )
    assert quarantine_id is not None
    return quarantine_id


# --- Messages --------------------------------------------------------------------------------


def test_the_message_proof_is_the_same_in_both_formats(demo_appliance: Path) -> None:
    facts = msgproof.store_facts()
    before = msgproof.store_proof(facts.upto_id)
    assert before.format_version == "2.8.0" and before.counts == facts.counts
    assert before.messages == 200 and not before.damaged
    _convert(demo_appliance)
    after = msgproof.store_proof(facts.upto_id)
    assert after.format_version == "2.8.1"
    assert msgproof.proof_differences(before, after) == []
    assert after.checksums == before.checksums


def test_reading_the_kept_copy_leaves_it_the_very_file_phase_4_recorded(
    demo_appliance: Path,
) -> None:
    facts = msgproof.store_facts()
    before = msgproof.store_proof(facts.upto_id)
    kept = _convert(demo_appliance)
    proof = msgproof.file_proof(kept.path, facts.upto_id)
    assert proof.format_version == "2.8.0"
    assert proof.checksums == before.checksums
    assert msgbackup.file_identity(kept.path) == kept.identity
    assert sorted(p.name for p in kept.path.parent.iterdir()) == [
        "msgstore-backup.db",
        "msgstore-backup.db.json",
    ]


def test_a_message_removed_after_the_conversion_fails_the_proof(demo_appliance: Path) -> None:
    facts = msgproof.store_facts()
    before = msgproof.store_proof(facts.upto_id)
    _convert(demo_appliance)
    victim = 17
    quarantine.quarantine_delete([victim])
    (difference,) = msgproof.proof_differences(before, msgproof.store_proof(facts.upto_id))
    assert difference.messages_after == difference.messages_before - 1
    assert not difference.checksum_equal


def test_a_message_altered_in_place_fails_the_proof_with_equal_counts(
    demo_appliance: Path,
) -> None:
    facts = msgproof.store_facts()
    before = msgproof.store_proof(facts.upto_id)
    _convert(demo_appliance)
    conn = sqlite3.connect(layout().msgstore_db)
    with conn:
        conn.execute("UPDATE quarantined_message SET subject = 'changed' WHERE id = 5")
    conn.close()
    (difference,) = msgproof.proof_differences(before, msgproof.store_proof(facts.upto_id))
    assert difference.messages_after == difference.messages_before
    assert not difference.checksum_equal


def test_a_damaged_body_is_named(demo_appliance: Path) -> None:
    facts = msgproof.store_facts()
    _convert(demo_appliance)
    conn = sqlite3.connect(layout().msgstore_db)
    with conn:
        conn.execute("UPDATE message_body SET sha256 = zeroblob(32) WHERE message_id = 9")
    conn.close()
    assert msgproof.store_proof(facts.upto_id).damaged == [9]


def test_messages_quarantined_after_the_mark_are_not_compared(demo_appliance: Path) -> None:
    facts = msgproof.store_facts()
    before = msgproof.store_proof(facts.upto_id)
    _convert(demo_appliance)
    assert _quarantine() > facts.upto_id
    assert msgproof.proof_differences(before, msgproof.store_proof(facts.upto_id)) == []


def test_the_proof_rests_after_each_block_and_computes_the_same_as_in_one_read(
    demo_appliance: Path,
) -> None:
    facts = msgproof.store_facts()
    whole = msgproof.store_proof(facts.upto_id)  # 200 messages: one block, no rest
    rests: list[float] = []
    conn = msgstore.connect(readonly=True)
    conn.row_factory = None
    try:
        paced = msgproof.proof_in(conn, facts.upto_id, yield_ratio=3.0, block=7, rest=rests.append)
    finally:
        conn.close()
    assert paced == whole
    assert len(rests) == 200 // 7 and all(pause > 0 for pause in rests)


def test_messages_check_passes_and_then_fails_on_a_removed_message(
    demo_appliance: Path,
) -> None:
    facts = msgproof.store_facts()
    kept = _convert(demo_appliance)
    content = msgproof.file_proof(kept.path, facts.upto_id).as_json()
    check = validation.messages_check(content, facts.messages)
    assert check["passed"], check["summary"]
    assert check["figures"]["messages_before"] == check["figures"]["messages_after"] == 200
    quarantine.quarantine_delete([3])
    check = validation.messages_check(content, facts.messages)
    assert not check["passed"]
    assert check["figures"]["messages_after"] == 199
    assert "content checksum differs" in check["summary"]


def test_messages_check_fails_when_the_kept_copy_is_not_what_phase_3_counted(
    demo_appliance: Path,
) -> None:
    kept = _convert(demo_appliance)
    content = msgproof.file_proof(kept.path).as_json()
    assert content["upto_id"] == msgproof.store_facts().upto_id
    check = validation.messages_check(content, 201)
    assert not check["passed"]
    assert "kept copy holds 200 messages, phase 3 counted 201" in check["summary"]


def test_messages_check_fails_without_the_content_of_the_moment_mail_stopped(
    demo_appliance: Path,
) -> None:
    check = validation.messages_check({"error": "the kept message store is gone"}, 200)
    assert not check["passed"] and "is gone" in check["summary"]


# --- Policy objects -----------------------------------------------------------------------------


def test_policy_check_passes_when_every_object_and_list_is_as_before(
    demo_appliance: Path,
) -> None:
    before = {"policy": policyproof.policy_facts(), "policy_error": ""}
    check = validation.policy_check(before)
    assert check["passed"], check["summary"]
    assert check["figures"]["file_objects"] == len(file_macro_objects()) > 0
    assert check["figures"]["files_read"] == check["figures"]["file_objects"]


def test_a_removed_file_list_fails_the_policy_check(demo_appliance: Path) -> None:
    before = {"policy": policyproof.policy_facts(), "policy_error": ""}
    obj = file_macro_objects()[0]
    object_file(obj).unlink()
    check = validation.policy_check(before)
    assert not check["passed"]
    assert obj.name in check["summary"] and "is gone" in check["summary"]


def test_a_changed_file_list_and_a_removed_object_fail_the_policy_check(
    demo_appliance: Path,
) -> None:
    before = policyproof.policy_facts()
    obj = file_macro_objects()[0]
    object_file(obj).write_text("other@example.net\n")
    objects = list_policy_objects()
    gone = next(o for o in objects if o.file_path is None)
    write_policy_objects([o for o in objects if o.id != gone.id])
    problems = {
        d.name: d.problem
        for d in policyproof.policy_differences(before, policyproof.policy_facts())
    }
    assert problems[gone.name] == "missing after the upgrade"
    assert "changed" in problems[obj.name]


def test_a_list_missing_before_the_upgrade_is_a_note_not_a_failure(demo_appliance: Path) -> None:
    obj = file_macro_objects()[0]
    object_file(obj).unlink()
    before = {"policy": policyproof.policy_facts(), "policy_error": ""}
    check = validation.policy_check(before)
    assert check["passed"]
    assert obj.file_path in check["note"]


# --- The pages ----------------------------------------------------------------------------------


def _run_with_report(passed: bool = True) -> InstallRun:
    run = install_run_row(InstallState.SUCCEEDED, 10, finished_at=timezone.now())
    checks = [
        validation.check_of("messages", True, "200 messages in 4 stores, equal"),
        validation.check_of(
            "policy", passed, "ok" if passed else "Blocked senders: its file is gone"
        ),
    ]
    report = validation._report_of(run, checks)
    validationfile.report_write(run.pk, report)
    run.details = {validation.SUMMARY: validation.report_summary(report)}
    run.save(update_fields=["details"])
    return run


def test_the_report_downloads_as_json_for_a_read_only_user(
    readonly_client, demo_appliance: Path
) -> None:
    run = _run_with_report()
    response = readonly_client.get(f"/updates/licensing/install/{run.pk}/validation.json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "attachment" in response["Content-Disposition"]
    report = json.loads(response.content)
    assert report["run"] == run.pk and report["passed"] is True


def test_the_printable_page_and_the_run_page_show_the_report(
    readonly_client, demo_appliance: Path
) -> None:
    run = _run_with_report(passed=False)
    page = readonly_client.get(f"/updates/licensing/install/{run.pk}/validation/")
    assert page.status_code == 200
    assert b"Policy objects and their $(FILE) lists: FAILED" in page.content
    assert b"failed checks: Policy objects and their $(FILE) lists</dd>" in page.content
    page = readonly_client.get(f"/updates/licensing/install/{run.pk}/")
    assert b'data-testid="validation"' in page.content
    assert b'data-testid="validation-policy" data-passed="false"' in page.content
    assert (
        b'data-testid="validation-outcome">Failed: Policy objects and their $(FILE) lists</span>'
        in page.content
    )


def test_the_report_pages_need_a_login(client, db, demo_appliance: Path) -> None:
    run = _run_with_report()
    for url in (
        f"/updates/licensing/install/{run.pk}/validation.json",
        f"/updates/licensing/install/{run.pk}/validation/",
    ):
        response = client.get(url)
        assert response.status_code == 302 and "/login" in response["Location"]


def test_a_run_without_a_report_is_404(admin_client, demo_appliance: Path) -> None:
    run = _run_with_report()
    validationfile.report_path(run.pk).unlink()
    assert (
        admin_client.get(f"/updates/licensing/install/{run.pk}/validation.json").status_code == 404
    )


def test_a_failed_check_is_one_notice_on_home(admin_client, demo_appliance: Path) -> None:
    _run_with_report(passed=True)
    assert validation.validation_notice() is None
    run = _run_with_report(passed=False)
    notice = validation.validation_notice()
    assert notice is not None and notice.level == "error"
    assert "policy objects" in notice.message and str(run.pk) in notice.link_url
    from upgrades.notifications import update_notices

    assert [n for n in update_notices() if n.link_label == "Validation report"] == [notice]


def test_the_install_page_sums_up_the_last_runs_report(admin_client, demo_appliance: Path) -> None:
    run = _run_with_report(passed=False)
    page = admin_client.get("/updates/licensing/install/")
    assert page.status_code == 200
    assert b'data-testid="latest-validation"' in page.content
    assert b"1 of 2 checks failed" in page.content
    assert f"/install/{run.pk}/validation.json".encode() in page.content


# --- update-control --report ------------------------------------------------------------------


@pytest.mark.usefixtures("cli_in_this_process", "db")
def test_report_prints_each_check_and_exits_0_when_all_passed(demo_appliance: Path, capsys) -> None:
    run = _run_with_report(passed=True)

    code, out, _ = update_control(capsys, "--report")

    assert code == 0
    assert f"(install run {run.pk}," in out
    assert "[PASS] Messages per message store: 200 messages in 4 stores, equal" in out
    assert "[PASS] Policy objects and their $(FILE) lists: ok" in out


@pytest.mark.usefixtures("cli_in_this_process", "db")
def test_report_exits_8_when_a_check_failed_and_json_is_the_file_as_stored(
    demo_appliance: Path, capsys
) -> None:
    failed = _run_with_report(passed=False)
    _run_with_report(passed=True)  # later: the last successful install

    code, out, _ = update_control(capsys, "--report", str(failed.pk))
    assert code == 8
    assert "[FAIL] Policy objects and their $(FILE) lists: Blocked senders: its file is gone" in out

    code, out, _ = update_control(capsys, "--report", str(failed.pk), "--json")
    assert code == 8
    assert out == validationfile.report_path(failed.pk).read_text(encoding="utf-8")
    assert json.loads(out)["passed"] is False


@pytest.mark.usefixtures("cli_in_this_process", "db")
def test_report_exits_3_without_a_report(demo_appliance: Path, capsys) -> None:
    code, _, err = update_control(capsys, "--report")
    assert code == 3 and "the last successful install: it has no validation report" in err

    code, _, err = update_control(capsys, "--report", "999")
    assert code == 3 and "install run 999: there is no such run" in err

    run = _run_with_report()
    validationfile.report_path(run.pk).unlink()
    code, _, err = update_control(capsys, "--report", str(run.pk), "--json")
    assert code == 3 and f"install run {run.pk}: it has no validation report" in err
