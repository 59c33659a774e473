"""The validation report after an upgrade: proof, check by check, that nothing was lost.

Phase 3 records what the appliance held the moment mail stopped (:func:`validation_before`):
the messages per message store and the highest message id, every policy object with the
digest of each ``$(FILE/...)`` list, and when the mail service began answering 421. Those are
cheap reads, taken inside the downtime; the content checksums of that moment are read later,
after the commit, from phase 4's kept copy of the old store (the very file, unwritten since:
its identity is checked), so the downtime pays nothing for them.

At the end of phase 10 (:func:`validation_write`), with mail flowing again, the report
compares them with the appliance as it is now:

* messages: per store, count and content checksum equal (a format-independent checksum, see
  :mod:`appliance.mail.msgproof`), for the messages that were there when mail stopped;
* policy objects: each still there with its name and type, each ``$(FILE)`` list present,
  readable and unchanged (:mod:`appliance.config.policyproof`);
* the mail service end to end: it accepts a new envelope now, phase 9's test message was
  tracked and left the outgoing spool (delivered), and a virus test message sent now is
  committed to the message store the policy names, then deleted again
  (:func:`upgrades.validation_checks.quarantine_now`). It is sent, not merely evaluated, so
  every install adds its line to the SMTP and tracking logs (the report says so); a copy an
  earlier attempt of phase 10 left is found by the run's mark, deleted, and taken off the
  run's ``messages_after``;
* the services healthy: phase 9's health check, maintenance off, the new firmware level and
  both formats 2.8.1;
* the downtime as the mail service saw it: from the maintenance it read (421 from then on) to
  the leave, compared with the console's measure.

A failed check never rolls anything back (the commit is done): it is an event with severity
error, a line in the log and a notice on Home (:func:`validation_notice`). The report is a JSON
file beside the run's log (appliance.firmware.validationfile) and its summary is kept in the
run's details.

Here: what is recorded when, the two proofs of the data carried over (messages, policy
objects), the report and its readers. The checks that ask the running mail service (SMTP,
services, downtime) and the shape of a check are :mod:`upgrades.validation_checks`'s; that
module never imports this one. Both proofs read whole stores while mail flows again, so they
rest between blocks as the conversion does (:func:`_yield_ratio`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from appliance.config import policyproof
from appliance.firmware import validationfile
from appliance.mail import msgproof
from appliance.system import maintenance, priority
from appliance.system.errors import ApplianceError
from events.models import Severity
from lmi.notices import Notice
from upgrades import validation_checks as service_checks
from upgrades.models import InstallRun, InstallState
from upgrades.phase_context import LeaseLost, event, log
from upgrades.validation_checks import TITLES, check_of, check_of_problems

T = TypeVar("T")

if TYPE_CHECKING:
    from upgrades.phase_context import PhaseContext

logger = logging.getLogger(__name__)

BEFORE = "validation_before"  # details: phase 3's facts
BEFORE_CONTENT = "validation_before_content"  # details: checksums of phase 4's kept copy
SUMMARY = "validation"  # details: the report's summary
REPORT_VERSION = 1


# --- Phase 3: the facts of the moment mail stopped -------------------------------------------


def validation_before(ctx: PhaseContext) -> None:
    """Record the appliance as it is with mail stopped; once (a rerun keeps the first record)."""
    if BEFORE in ctx.details:
        return
    state = maintenance.maintenance_status()
    objects, policy_error = policyproof.policy_facts_or_error()
    # No read of the message store here: every second of this phase is downtime. Phase 4's
    # kept copy is the store of this very moment, read after the commit (_before_content).
    ctx.save_details(
        **{
            BEFORE: {
                "at": timezone.now().isoformat(),
                "maintenance_since": state.since.isoformat() if state is not None else None,
                "policy": objects,
                "policy_error": policy_error,
            }
        }
    )


# --- Phase 10: the report --------------------------------------------------------------------


def _before_content(ctx: PhaseContext) -> None:
    """Checksums of the old store from phase 4's kept copy, saved before the work folder
    goes (a rerun of phase 10 after that finds them in the run)."""
    if BEFORE_CONTENT in ctx.details:
        return
    backup = ctx.details.get("store_backup", {})
    content: dict[str, Any]
    try:
        if not backup.get("path"):
            raise ApplianceError("phase 4 recorded no kept copy of the message store")
        content = _kept_copy_proof(Path(backup["path"]), backup)
    except (ApplianceError, OSError) as exc:
        content = {"error": str(exc)}
    ctx.save_details(**{BEFORE_CONTENT: content})


def _kept_copy_proof(path: Path, backup: dict[str, Any]) -> dict[str, Any]:
    from appliance.mail import msgbackup

    identity = backup.get("identity")
    expected = [int(part) for part in _parts(identity)] if identity else None
    # The old store's own file: written since phase 4, it would not be that moment's.
    if backup.get("linked") and expected and list(msgbackup.file_identity(path)) != expected:
        raise ApplianceError(f"the kept message store {path} was written since phase 4")
    return _niced(lambda: msgproof.file_proof(path, yield_ratio=_yield_ratio())).as_json()


def _yield_ratio() -> float:
    """The proofs read the whole store while mail flows again: they rest as the conversion
    does (INSTALL_MIGRATE_YIELD_PERCENT of each block's time), so mail keeps its share."""
    return float(settings.INSTALL_MIGRATE_YIELD_PERCENT) / 100


def _niced(read: Callable[[], T]) -> T:
    """A proof read at the conversion's low priority too, in a thread of its own
    (:func:`appliance.system.priority.at_low_priority`): mail flows again by phase 10."""
    return priority.at_low_priority(lambda _progress, _stop: read(), name="phase-10-proof")


def _parts(value: Any) -> list[str]:
    """A tuple saved by upgrades.phases._plain (a list, or its str) as its parts."""
    if isinstance(value, list | tuple):
        return [str(part) for part in value]
    return [part.strip() for part in str(value).strip("()[]").split(",") if part.strip()]


def validation_write(ctx: PhaseContext) -> dict[str, Any]:
    """Phase 10, after the commit: build and write the report, keep its summary, and say so.

    Never raises for a failed check or a broken measurement (the commit is done and stays):
    those are failed checks in the report. Only losing the run to another executor stops it.
    """
    run = ctx.run
    try:
        _before_content(ctx)
        report = validation_report(run)
    except LeaseLost:
        raise
    except Exception as exc:  # the report must never hold up or undo the commit
        logger.exception("install %s: the validation report could not be built", run.pk)
        report = _report_of(
            run, [check_of("report", False, f"the report could not be built: {exc}")]
        )
    _earlier_test_message_uncounted(ctx, report)
    try:
        validationfile.report_write(run.pk, report)
    except OSError as exc:
        report["write_error"] = str(exc)
    summary = report_summary(report)
    ctx.save_details(**{SUMMARY: summary})
    failed = summary["failed"]
    if failed:
        titles = "; ".join(
            f"{c['title']}: {c['summary']}" for c in report["checks"] if not c["passed"]
        )
        log(run, f"validation report: {len(failed)} check(s) failed: {titles}")
        event(
            f"Validation report of the upgrade to {run.version}: {len(failed)} of "
            f"{summary['total']} checks failed ({', '.join(failed)})",
            severity=Severity.ERROR,
            run=run.pk,
            failed=failed,
        )
    else:
        log(run, f"validation report: all {summary['total']} checks passed")
        event(
            f"Validation report of the upgrade to {run.version}: all {summary['total']} checks "
            "passed",
            run=run.pk,
        )
    return report


def _earlier_test_message_uncounted(ctx: PhaseContext, report: dict[str, Any]) -> None:
    """A quarantine test message an earlier attempt of this phase left (its worker died between
    the send and the deletion) was in the store when this attempt counted ``messages_after``,
    and the report has deleted it: it never was the appliance's, so it comes off that count."""
    smtp = next((c for c in report["checks"] if c["key"] == "smtp"), {})
    earlier = int(smtp.get("figures", {}).get("quarantine", {}).get("removed_earlier") or 0)
    if earlier and ctx.run.messages_after is not None:
        ctx.set_run(messages_after=ctx.run.messages_after - earlier)


def validation_report(run: InstallRun, *, now: datetime | None = None) -> dict[str, Any]:
    """Every check of the report against the appliance as it is now (reads only, except the
    SMTP envelope it opens and drops, and the virus test message it sends and deletes)."""
    details = run.details or {}
    before = details.get(BEFORE, {})
    smtp_seen = service_checks.smtp_now()
    checks = [
        messages_check(details.get(BEFORE_CONTENT, {}), run.messages_before),
        policy_check(before),
        service_checks.smtp_check(run, smtp_seen),
        service_checks.services_check(run, smtp_seen),
        service_checks.downtime_check(run, before),
    ]
    return _report_of(run, checks, now=now)


def _report_of(
    run: InstallRun, checks: list[dict[str, Any]], *, now: datetime | None = None
) -> dict[str, Any]:
    return {
        "report_version": REPORT_VERSION,
        "run": run.pk,
        "version": run.version,
        "from_version": run.from_version,
        "written_at": (now or timezone.now()).isoformat(),
        "passed": all(check["passed"] for check in checks),
        "checks": checks,
    }


def report_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the run keeps of its report: pass or fail per check, and where the file is."""
    checks = report.get("checks", [])
    return {
        "passed": bool(report.get("passed")),
        "total": len(checks),
        "failed": [c["key"] for c in checks if not c["passed"]],
        "checks": {c["key"]: c["passed"] for c in checks},
        "file": validationfile.report_name(int(report.get("run", 0))),
        "written_at": report.get("written_at"),
    }


# --- The checks --------------------------------------------------------------------------------


def messages_check(content: dict[str, Any], messages_before: int | None) -> dict[str, Any]:
    """Per store: count and content checksum now equal those of the moment mail stopped
    (``content``: the proof of phase 4's kept copy; ``messages_before``: phase 3's count)."""
    if "error" in content or not content:
        return check_of(
            "messages",
            False,
            "the content when mail stopped could not be read: "
            + str(content.get("error", "no record")),
        )
    before = msgproof.StoreProof.from_json(content)
    upto = before.upto_id
    try:
        after = _niced(lambda: msgproof.store_proof(upto, yield_ratio=_yield_ratio()))
    except (ApplianceError, OSError) as exc:
        return check_of("messages", False, f"the message store cannot be read now: {exc}")
    problems: list[str] = []
    if messages_before is not None and before.messages != messages_before:
        problems.append(
            f"phase 4's kept copy holds {before.messages} messages, phase 3 counted "
            f"{messages_before}"
        )
    differences = msgproof.proof_differences(before, after)
    for diff in differences:
        problems.append(
            f"{diff.store}: {diff.messages_before or 0} messages before, "
            f"{diff.messages_after or 0} after"
            + ("" if diff.checksum_equal else ", content checksum differs")
        )
    if after.damaged:
        problems.append(f"{len(after.damaged)} stored message(s) fail their own checksum")
    stores = []
    for store in sorted(before.counts.keys() | after.counts.keys()):
        if not before.counts.get(store) and not after.counts.get(store):
            continue
        stores.append(
            {
                "store": store,
                "messages_before": before.counts.get(store, 0),
                "messages_after": after.counts.get(store, 0),
                "checksum_before": before.checksums.get(store, ""),
                "checksum_after": after.checksums.get(store, ""),
                "equal": before.counts.get(store, 0) == after.counts.get(store, 0)
                and before.checksums.get(store) == after.checksums.get(store),
            }
        )
    figures = {
        "messages_before": before.messages,
        "messages_after": after.messages,
        "up_to_message_id": upto,
        "format_before": before.format_version,
        "format_after": after.format_version,
        "stores": stores,
        "damaged_ids": after.damaged[:20],
    }
    return check_of_problems(
        "messages",
        problems,
        f"{after.messages} messages in {len(stores)} stores, counts and content checksums equal",
        figures,
        note="Messages quarantined after mail was accepted again are not compared.",
    )


def policy_check(before: dict[str, Any]) -> dict[str, Any]:
    """Every object of the moment mail stopped still there, its $(FILE) list read and equal."""
    old = before.get("policy")
    if old is None or before.get("policy_error"):
        why = before.get("policy_error") or "nothing recorded when mail stopped"
        return check_of("policy", False, f"the policy objects before could not be read: {why}")
    now, error = policyproof.policy_facts_or_error()
    if error:
        return check_of("policy", False, f"the policy objects cannot be read now: {error}")
    differences = policyproof.policy_differences(old, now)
    with_files = [o for o in old if o.get("file_path")]
    broken_before = [o["file_path"] for o in with_files if not o.get("file_sha256")]
    figures = {
        "objects_before": len(old),
        "objects_after": len(now),
        "file_objects": len(with_files),
        "files_read": sum(1 for o in now if o.get("file_path") and o.get("file_sha256")),
        "objects": [
            {
                "name": o["name"],
                "type": o["type"],
                "file": o.get("file_path") or "",
                "entries": o.get("file_entries"),
            }
            for o in now
        ],
        "differences": [f"{d.name}: {d.problem}" for d in differences],
        "missing_before": broken_before,
    }
    note = (
        f"Already missing before the upgrade: {', '.join(broken_before)}." if broken_before else ""
    )
    if differences:
        return check_of(
            "policy",
            False,
            "; ".join(f"{d.name}: {d.problem}" for d in differences),
            figures,
            note,
        )
    return check_of(
        "policy",
        True,
        f"{len(old)} objects as before, {figures['files_read']} $(FILE) lists present and read",
        figures,
        note,
    )


# --- Readers: the page, the download, the notice ---------------------------------------------


def validation_read(run: InstallRun) -> dict[str, Any] | None:
    """The run's report as written, or None (not written yet, or not a successful install)."""
    try:
        return validationfile.report_read(run.pk)
    except ApplianceError:
        logger.exception("install %s: its validation report cannot be read", run.pk)
        return None


def report_of_run(run_id: int | None = None) -> tuple[InstallRun | None, dict[str, Any] | None]:
    """Run ``run_id`` (or, without one, the last successful install: the one the notice and
    the Install page speak of) and its report; (None, None) when there is no such run."""
    runs = InstallRun.objects.all()
    if run_id is None:
        runs = runs.filter(state=InstallState.SUCCEEDED).order_by("-finished_at", "-pk")
    else:
        runs = runs.filter(pk=run_id)
    run = runs.first()
    return (run, validation_read(run)) if run is not None else (None, None)


def report_text(report: dict[str, Any]) -> str:
    """The report for a terminal (update-control --report): one line per check."""
    lines = [
        f"Validation report of the upgrade to firmware {report.get('version')} "
        f"(install run {report.get('run')}, written {report.get('written_at')}):"
    ]
    for check in report.get("checks", []):
        mark = "PASS" if check.get("passed") else "FAIL"
        lines.append(f"[{mark}] {check.get('title')}: {check.get('summary')}")
    return "\n".join(lines)


def validation_notice() -> Notice | None:
    """One notice while the last successful install's report has a failed check."""
    run = (
        InstallRun.objects.filter(state=InstallState.SUCCEEDED)
        .order_by("-finished_at", "-pk")
        .first()
    )
    if run is None:
        return None
    summary = (run.details or {}).get(SUMMARY)
    if not summary or summary.get("passed"):
        return None
    failed = summary.get("failed") or []
    names = ", ".join(TITLES.get(key, key).lower() for key in failed)
    return Notice(
        "error",
        f"The validation report of the upgrade to firmware {run.version} has "
        f"{len(failed)} failed check{'s' if len(failed) != 1 else ''}: {names}.",
        "Validation report",
        reverse("upgrades:install_run", args=[run.pk]) + "#validation",
    )
