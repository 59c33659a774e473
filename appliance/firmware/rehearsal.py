"""The upgrade rehearsal: the install's conversion, run against a snapshot of the appliance.

An administrator wants to know, before the maintenance window, what the upgrade will do to this
very appliance. The rehearsal answers by doing it: the work of phases 2 and 4 to 9 runs on a
snapshot of the root (:mod:`appliance.system.snapshot`) in a scratch folder, through the very
functions the install calls, each given the scratch root. The live appliance is only read (to
make the snapshot); mail keeps flowing, nothing enters maintenance, no SMTP probe is sent.

What it measures and how it maps to the real install:

- phase 2 (mail flows): the new system into the inactive slot, the message store's online copy
  to the 2.8.1 format (``migrate_prepare``), the flush to disk;
- the downtime window (phases 3-9 of the real install): the message count, the store kept for
  the rollback, the configuration backup read back, the switch, ``migrate_finish`` and the
  configuration conversion, the clean-up. Mail does not reach the snapshot, so before the
  window the rehearsal marks the last chunk of each big table as changed in the snapshot's
  journal, as the mail of phase 2's last moments does in a real install: ``migrate_finish``
  then copies and verifies as much as it will on the day;
- what cannot be measured without stopping mail (the drain, the health check's test message,
  the install's own records between phases) is :data:`UNMEASURED_DOWNTIME_S`, from
  bench/upgrade.py on this machine, added to give the downtime the real install will have.

It also reports every warning the conversion meets (:func:`config_warnings`: elements and types
the 2.8.1 format does not know, ``$(FILE...)`` objects and their files, values that would mean
something else or be refused after the upgrade) and the configuration before and after, as the
backup comparison describes it. The scratch folder is removed at the end, also on failure.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from appliance.config import backupdiff, configbackup, configconvert
from appliance.config.mailpolicy import parse_mail_policy
from appliance.config.policy import OBJECT_TYPES, file_macro_path, parse_policy_objects
from appliance.config.smtp import SmtpSettings, parse_smtp_settings
from appliance.firmware import firmware
from appliance.mail import msgbackup, msgmigrate, msgstore
from appliance.mail.msgcounts import CHUNK_BITS, CHUNKED_TABLES
from appliance.mail.msgjournal import JOURNAL
from appliance.system import priority, snapshot
from appliance.system.errors import ApplianceError
from appliance.system.paths import appliance_root, layout, resolve_inside
from appliance.system.safexml import parse_xml

# The part of the real downtime a rehearsal cannot measure without stopping mail: the drain,
# the health check's test message and its tracking, leaving maintenance, and the install's own
# records between phases (events, log lines, its run row). bench/upgrade.py, 2 cores,
# 2026-12-06: the measured downtime minus the rehearsal's measured work was 0.23 s at 200k
# messages and 0.26 s at 1M.
UNMEASURED_DOWNTIME_S = 0.25
STEPS = 5  # snapshot, new system, store copy, downtime work, report

Progress = Callable[[int, str], None]
ShouldStop = Callable[[], bool]


class RehearsalStopped(ApplianceError):
    """The rehearsal was asked to stop; the scratch folder is removed, nothing else changed."""


class RehearsalFailed(ApplianceError):
    """A step failed on the snapshot, as it would fail the real install; ``report`` holds what
    was found before (the step, the warnings), for the administrator."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Finding:
    """One thing the conversion met that an administrator should know before the upgrade."""

    kind: str  # "unknown" | "file" | "meaning"
    level: str  # "warn" | "info"
    subject: str
    message: str


@dataclass
class Timings:
    """Seconds of each measured step, by the install phase it stands for."""

    snapshot_s: float = 0.0
    phase2_slot_s: float = 0.0
    phase2_copy_s: float = 0.0  # migrate_prepare: the store's online copy
    phase2_sync_s: float = 0.0
    window: dict[str, float] = field(default_factory=dict)  # phase -> seconds, phases 3-9

    @property
    def downtime_work_s(self) -> float:
        return round(sum(self.window.values()), 3)


# --- What the conversion meets ------------------------------------------------------------


def _elements(element: Any) -> list[Any]:
    return [child for child in element if isinstance(child.tag, str)]


def _object_findings(data: bytes, base: Path) -> list[Finding]:
    findings: list[Finding] = []
    root = parse_xml(data)
    for child in _elements(root):
        if child.tag != "object":
            findings.append(
                Finding(
                    "unknown",
                    "warn",
                    f"<{child.tag}>",
                    f"The policy objects file holds an element <{child.tag}> that is not a "
                    "policy object: the 2.8.1 configuration does not carry it over.",
                )
            )
    names = {o.id: o.name for o in parse_policy_objects(data)}
    for element in root.iter("object"):
        name = names.get(element.get("id", ""), element.get("id", "?"))
        for extra in sorted(set(element.attrib) - {"id", "type"}):
            findings.append(
                Finding(
                    "unknown",
                    "warn",
                    name,
                    f"Policy object {name!r}: attribute {extra}={element.get(extra)!r} is not "
                    "part of a policy object and is not carried over.",
                )
            )
        for child in _elements(element):
            if child.tag not in ("name", "value"):
                findings.append(
                    Finding(
                        "unknown",
                        "warn",
                        name,
                        f"Policy object {name!r}: element <{child.tag}> is not part of a "
                        "policy object and is not carried over.",
                    )
                )
    for obj in parse_policy_objects(data):
        if obj.type not in OBJECT_TYPES:
            findings.append(
                Finding(
                    "unknown",
                    "warn",
                    obj.name,
                    f"Policy object {obj.name!r} has the type {obj.type!r}, which the console "
                    "does not know: it is carried over as it is, but no rule can use it.",
                )
            )
        path = file_macro_path(obj.value)
        if path is None:
            continue
        if obj.value != obj.value.strip():
            findings.append(
                Finding(
                    "meaning",
                    "warn",
                    obj.name,
                    f"Policy object {obj.name!r}: its $(FILE{path}) value has spaces around "
                    "it, so 2.8.1 keeps it as text and records no checksum of the file; "
                    "remove the spaces to have the file's carry-over proven.",
                )
            )
        findings.append(_file_finding(obj.name, path, base))
    return findings


def _file_finding(name: str, path: str, base: Path) -> Finding:
    try:
        data = resolve_inside(base, path).read_bytes()
    except (OSError, ValueError) as exc:
        reason = "is outside the appliance" if isinstance(exc, ValueError) else "does not exist"
        return Finding(
            "file",
            "warn",
            name,
            f"Policy object {name!r} reads $(FILE{path}), which {reason}: the object is empty "
            "before and after the upgrade. Restore the file or change the object.",
        )
    lines = len(data.decode("utf-8", "replace").splitlines())
    return Finding(
        "file",
        "info",
        name,
        f"Policy object {name!r} reads $(FILE{path}) ({lines} line{'s' * (lines != 1)}, "
        f"{len(data)} bytes): the file is carried over with its checksum.",
    )


def _smtp_findings(data: bytes) -> list[Finding]:
    findings: list[Finding] = []
    known = {spec.name for spec in fields(SmtpSettings)}
    for child in _elements(parse_xml(data)):
        if child.tag not in known:
            findings.append(
                Finding(
                    "unknown",
                    "warn",
                    f"SMTP <{child.tag}>",
                    f"The SMTP setting <{child.tag}> is not known to 2.8.1 and is dropped by "
                    "the conversion.",
                )
            )
    smtp = parse_smtp_settings(data)
    try:
        smtp.validate()
    except ValueError as exc:
        findings.append(
            Finding(
                "meaning",
                "warn",
                "SMTP settings",
                f"The SMTP settings convert as they are, but 2.8.1 refuses to save them until "
                f"this is changed: {exc}.",
            )
        )
    return findings


def _policy_findings(data: bytes, objects: bytes | None) -> list[Finding]:
    findings: list[Finding] = []
    allowed = {
        "rule": {"type", "object", "threshold", "senders"},
        "quarantine": {"verdict", "store"},
    }
    for element in _elements(parse_xml(data)):
        for extra in sorted(set(element.attrib) - allowed.get(str(element.tag), set())):
            findings.append(
                Finding(
                    "unknown",
                    "warn",
                    f"mail policy <{element.tag}>",
                    f"The mail policy's <{element.tag}> carries {extra}={element.get(extra)!r}, "
                    "which 2.8.1 does not know: it is dropped by the conversion.",
                )
            )
    if objects is not None:
        try:
            parse_mail_policy(data).validate(parse_policy_objects(objects))
        except ValueError as exc:
            findings.append(
                Finding(
                    "meaning",
                    "warn",
                    "mail policy",
                    f"The mail policy converts as it is, but the mail service ignores a rule "
                    f"that does not hold: {exc}.",
                )
            )
    return findings


def config_warnings(root: Path | None = None) -> list[Finding]:
    """What converting this (2.8.0) configuration meets, read from its files; nothing for a
    configuration already in the 2.8.1 format."""
    base = appliance_root(root)
    cpe = layout(base).cpe_dir

    def read(name: str) -> bytes | None:
        try:
            return (cpe / name).read_bytes()
        except FileNotFoundError:
            return None

    objects = read("mailsec_policyobjects1_1.xml")
    smtp = read("mailsec_smtp1_0.xml")
    policy = read("mailsec_policy1_0.xml")
    findings: list[Finding] = []
    if objects is not None:
        findings += _object_findings(objects, base)
    if smtp is not None:
        findings += _smtp_findings(smtp)
    if policy is not None:
        findings += _policy_findings(policy, objects)
    return findings


# --- The rehearsal ------------------------------------------------------------------------


def _mark_last_moments(root: Path) -> int:
    """Journal the last chunk of each big table of the snapshot's store as changed, as the mail
    of phase 2's last moments does; the chunks marked."""
    db = layout(root).msgstore_db
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    marked = 0
    try:
        with msgstore.write_transaction(conn):
            for big in CHUNKED_TABLES:
                table, key = big.table[msgstore.FORMAT_VERSION], big.key[msgstore.FORMAT_VERSION]
                top = conn.execute(f"SELECT max({key}) FROM {table}").fetchone()[0]  # noqa: S608
                if top is None:
                    continue
                conn.execute(
                    f"INSERT OR IGNORE INTO {JOURNAL} (tbl, chunk) VALUES (?, ?)",  # noqa: S608
                    (big.name, int(top) >> CHUNK_BITS),
                )
                marked += 1
    finally:
        conn.close()
    return marked


PHASE_WORK = {
    "3": "counting the message store",
    "4": "keeping the message store for the rollback",
    "5": "reading the configuration backup back",
    "6": "switching to the new system",
    "7": "migrating the message store",
    "8": "converting the configuration",
    "9": "removing temporary files",
}


class PhaseWouldFail(ApplianceError):
    """A downtime phase failed on the snapshot: the real install would fail there and roll
    back. ``phase`` is its number."""

    def __init__(self, phase: str, exc: BaseException) -> None:
        super().__init__(f"phase {phase} ({PHASE_WORK[phase]}): {exc}")
        self.phase = phase


@contextmanager
def _timed(timings: Timings, phase: str) -> Iterator[None]:
    began = time.monotonic()
    try:
        yield
    except (ApplianceError, OSError, ValueError) as exc:
        raise PhaseWouldFail(phase, exc) from exc
    timings.window[phase] = round(time.monotonic() - began, 3)


def _downtime_window(
    scratch: Path, version: str, new_slot: str, backup: str, timings: Timings
) -> configconvert.ConvertResult:
    """Phases 3-9's work on the snapshot, each timed (what the real install does with mail
    stopped; maintenance, drain and health check excepted)."""
    workdir = scratch / "var" / "spool" / "updates" / "rehearsal"
    with _timed(timings, "3"):
        msgstore.totals(scratch)
    with _timed(timings, "4"):
        msgbackup.msgstore_backup(workdir / "msgstore-backup.db", root=scratch)
    with _timed(timings, "5"):
        configbackup.backup_load(backup, root=scratch)
    with _timed(timings, "6"):
        firmware.slot_switch(new_slot, root=scratch)
        firmware.firmware_level_set(version, firmware.slot_os_release(new_slot, scratch), scratch)
    with _timed(timings, "7"):
        msgmigrate.migrate_finish(scratch)
    with _timed(timings, "8"):
        converted = configconvert.config_convert(scratch)
    with _timed(timings, "9"):
        msgmigrate.migrate_discard(scratch)
        firmware.staging_cleanup(scratch)
    return converted


def rehearse(
    bundle: Path,
    version: str,
    root: Path | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    pause: float = 0.0,
    yield_ratio: float = 0.0,
    disk_usage: snapshot.DiskUsage | None = None,
) -> dict[str, Any]:
    """Rehearse the install of ``bundle`` (firmware ``version``) on a snapshot of ``root``.

    Returns the report as plain JSON values. Raises :class:`snapshot.SnapshotError` when the
    disk cannot hold the snapshot, :class:`RehearsalStopped` when ``should_stop`` said so, and
    whatever the conversion itself raises (that is what the real install would meet: the
    report of a failed rehearsal is the error). The scratch folder is gone when it returns.
    """
    live = appliance_root(root)
    scratch = snapshot.scratch_path(live)
    timings = Timings()
    stop = should_stop or (lambda: False)
    doing = ""
    warnings: list[Finding] = []

    def step(number: int, name: str) -> None:
        nonlocal doing
        if stop():
            raise RehearsalStopped("The rehearsal was stopped; the live appliance was not touched.")
        doing = name
        if progress is not None:
            progress(number, name)

    try:
        step(0, "Taking a snapshot of the appliance")
        snap = snapshot.snapshot_create(live, scratch, disk_usage=disk_usage, should_stop=stop)
        timings.snapshot_s = snap.seconds
        doing = "Reading the configuration"
        warnings = config_warnings(scratch)
        before = backupdiff.configuration_description(scratch)
        doing = "The configuration backup the install takes when it starts"
        backup = configbackup.backup_create(
            created_by="rehearsal", trigger="pre-install", root=scratch
        ).name
        totals = msgstore.totals(scratch)
        messages = totals.messages if totals is not None else 0
        step(1, "Installing the new system into the inactive slot (phase 2)")
        began = time.monotonic()
        image = firmware.slot_install(bundle, scratch, should_stop=stop)
        timings.phase2_slot_s = round(time.monotonic() - began, 3)
        step(2, "Copying the message store to the 2.8.1 format (phase 2)")
        # Niced, as the install's phase 2 runs it: the copy's time is the install's.
        prepared = priority.at_low_priority(
            lambda _progress, stop_asked: msgmigrate.migrate_prepare(
                scratch, should_stop=stop_asked, pause=pause, yield_ratio=yield_ratio
            ),
            name="rehearsal-copy",
            should_stop=stop,
        )
        timings.phase2_copy_s = prepared.seconds
        began = time.monotonic()
        msgmigrate.checkpoint_passive(scratch)
        os.sync()
        timings.phase2_sync_s = round(time.monotonic() - began, 3)
        marked = _mark_last_moments(scratch) if prepared.counts is not None else 0
        step(3, "Converting with mail stopped, as phases 3-9 will (the live mail flows on)")
        converted = _downtime_window(scratch, version, image.slot, backup, timings)
        step(4, "Comparing the configuration before and after")
        after = backupdiff.configuration_description(scratch)
        diff = backupdiff.description_diff(before, after)
    except (RehearsalStopped, snapshot.SnapshotError):
        raise
    except (ApplianceError, OSError, ValueError) as exc:
        if isinstance(exc, PhaseWouldFail):
            reason, doing = f"The install would fail in {exc}", f"phase {exc.phase}"
        else:
            reason = f"{doing}: {exc}" if doing else str(exc)
        raise RehearsalFailed(
            reason,
            {
                "version": version,
                "error": reason,
                "failed_step": doing,
                "warnings": [asdict(finding) for finding in warnings],
            },
        ) from exc
    finally:
        snapshot.snapshot_remove(scratch)
    carried = {f.path for f in converted.files_carried}
    predicted = round(timings.downtime_work_s + UNMEASURED_DOWNTIME_S, 3)
    return {
        "version": version,
        "messages": messages,
        "snapshot": {
            "method": snap.method,
            "linked": snap.linked,
            "copied": snap.copied,
            "bytes_copied": snap.bytes_copied,
            "seconds": snap.seconds,
        },
        "timings": {**asdict(timings), "downtime_work_s": timings.downtime_work_s},
        "conversion_s": round(
            timings.phase2_copy_s + timings.window.get("7", 0.0) + timings.window.get("8", 0.0),
            3,
        ),
        "chunks_marked": marked,
        "downtime_s": predicted,
        "unmeasured_downtime_s": UNMEASURED_DOWNTIME_S,
        "converted": {
            "objects": converted.objects,
            "rules": converted.rules,
            "quarantines": converted.quarantines,
            "settings": converted.settings,
            "files_carried": sorted(carried),
            "files_missing": list(converted.files_missing),
        },
        "warnings": [asdict(finding) for finding in warnings],
        "diff": [asdict(item) for item in diff],
    }
