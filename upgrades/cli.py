"""update-control: the appliance's command-line tool for firmware updates.

    update-control --check          ask the update feed for new firmware
    update-control -d fw            download the newest firmware here, with a progress bar
    update-control --preflight      the checklist an install must pass (--json for scripts)
    update-control -i fw            install the downloaded firmware, following its ten phases
    update-control -i fw --at "YYYY-MM-DD HH:MM"   install it at that time (appliance's clock)
    update-control --cancel-schedule               cancel the scheduled install
    update-control --rehearse [--json]  rehearse the install on a snapshot, print its figures
    update-control --report [RUN] [--json]  the validation report of the last successful install
    update-control --return         return to the previous firmware (within its retention period)
    update-control -s [--json]      status (--json for scripts)

Exit codes: 0 success, 1 failure, 2 usage error, 3 nothing to do (no newer firmware, or it is
already downloaded; for -i: nothing downloaded to install), 4 a preflight check failed (nothing
was changed), 5 the install failed and was rolled back to the exact previous state, 6 the
install failed and could not roll back (needs attention), 7 the install was aborted, 130
detached with Ctrl-C from a running install (which goes on in the worker). --report: 0 every
check passed, 8 a check failed, 3 no report (no successful install yet, or none for that run).
--return: as -i (3: nothing to return to, or its retention period is over; 5: the return
failed and the newer firmware runs as before).

The download runs in this process through the same service as the worker's task and holds the
same one-at-a-time claim; Ctrl-C cancels it cleanly (the part file is deleted). The install runs
in the console's worker, as when it is started from the console: this tool starts it and
follows it, so closing the shell (or Ctrl-C) never leaves it half done. Django is set up from the
project this package lives in (lmi.settings), so the tool works from any directory with the same
LMI_* environment as the console.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from upgrades.cli_output import (  # noqa: F401 - every exit code, as upgrades.cli names
    EXIT_ABORTED,
    EXIT_DETACHED,
    EXIT_FAILURE,
    EXIT_INSTALL_FAILED,
    EXIT_NOTHING_TO_DO,
    EXIT_OK,
    EXIT_PREFLIGHT_FAILED,
    EXIT_ROLLED_BACK,
    EXIT_USAGE,
    EXIT_VALIDATION_FAILED,
    FOLLOW_INTERVAL,
    PhaseDisplay,
    ProgressBar,
    cli_user,
    failed_reason,
    follow_install,
    follow_started,
    human_bytes,
    human_duration,
    print_checks,
)

COMPONENTS = ("fw",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="update-control",
        description="Firmware updates of the Lotus Protector for Mail Security appliance.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage error, 3 nothing to do, 4 preflight "
        "failed, 5 install rolled back, 6 install failed (needs attention), 7 install aborted, "
        "8 a validation check failed, 130 detached from a running install.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="check the update feed now")
    action.add_argument(
        "-d", "--download", metavar="COMPONENT", choices=COMPONENTS,
        help="download the newest firmware (COMPONENT: fw)",
    )  # fmt: skip
    action.add_argument(
        "-i", "--install", metavar="COMPONENT", choices=COMPONENTS,
        help="install the downloaded firmware (COMPONENT: fw)",
    )  # fmt: skip
    action.add_argument(
        "--preflight", action="store_true", help="show the checks an install must pass"
    )
    action.add_argument("-s", "--status", action="store_true", help="show the update status")
    action.add_argument(
        "--cancel-schedule", action="store_true", help="cancel the scheduled install"
    )
    action.add_argument(
        "--rehearse", action="store_true",
        help="rehearse the install on a snapshot (the appliance keeps serving mail)",
    )  # fmt: skip
    action.add_argument(
        "--report", nargs="?", const=0, type=int, metavar="RUN",
        help="the validation report of the last successful install (or of install run RUN)",
    )  # fmt: skip
    action.add_argument(
        "--return", dest="go_back", action="store_true",
        help="return to the firmware the last upgrade replaced (within its retention period)",
    )  # fmt: skip
    parser.add_argument(
        "--at", metavar="TIME", help='with -i fw: install at "YYYY-MM-DD HH:MM" instead of now'
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def setup_django() -> None:
    """Point Django at this project's settings, wherever the tool is started from."""
    project = Path(__file__).resolve().parent.parent
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
    import django

    django.setup()
    # The console's process log would interleave with the progress bar; events still go to the
    # event log, and warnings still show.
    logging.getLogger().setLevel(logging.WARNING)


def _print_status(status: dict[str, Any], out: TextIO) -> None:
    def row(label: str, value: str) -> None:
        out.write(f"{label + ':' if label else '':<22}{value}\n")

    def when(iso: str) -> str:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S %Z").strip()

    story = status["story"]
    row("Status", story["headline"] + (f" {story['reason']}" if story["reason"] else ""))
    row("Installed firmware", status["installed_version"] or "unknown")
    check = status["last_check"]
    if check is None:
        row("Last check", "never")
    elif check["ok"]:
        found = check["newest_available"]
        result = f"firmware {found} available" if found else "no newer firmware"
        row("Last check", f"{when(check['checked_at'])} ({result})")
    else:
        row("Last check", f"{when(check['checked_at'])} FAILED: {check['error']}")
    if not status["offers"]:
        row("Available firmware", "none listed")
    for index, offer in enumerate(status["offers"]):
        row(
            "Available firmware" if index == 0 else "",
            f"{offer['version']} ({human_bytes(offer['size'])}): {offer['status']}",
        )
    download = status["download"]
    if download is None:
        row("Download", "none")
    elif download["state"] in ("queued", "running", "verifying"):
        row(
            "Download",
            f"firmware {download['version']} {download['state_label'].lower()}: "
            f"{download['percent']:.1f}% ({human_bytes(download['bytes_done'])} of "
            f"{human_bytes(download['size'])}, {human_bytes(download['rate_bytes_per_second'])}/s, "
            f"ETA {human_duration(download['eta_seconds'])})",
        )
    elif download["state"] == "failed":
        row("Download", f"firmware {download['version']} failed: {download['error']}")
    else:
        row("Download", f"firmware {download['version']} {download['state_label'].lower()}")
    ready = status["ready"]
    row("Ready to install", f"firmware {ready['version']}" if ready else "nothing")
    row("Automatic downloads", "on" if status["automatic_downloads"] else "off")
    lic = status["license"]
    if lic["customer"]:
        row(
            "License",
            f"{lic['customer']}, serial {lic['serial']}, updates until {lic['updates_until']} "
            f"({lic['status'].lower()})",
        )
    else:
        row("License", lic["reason"] or lic["status"])
    run = status.get("install")
    if run is not None:
        where = f", phase {run['phase']}/10" if run["active"] else ""
        outcome = f": {run['error']}" if run["error"] and not run["active"] else ""
        row("Install", f"firmware {run['version']} {run['state_label'].lower()}{where}{outcome}")
    scheduled = status.get("schedule")  # issue 18
    if scheduled is not None:
        who = f" by {scheduled['requested_by']}" if scheduled["requested_by"] else ""
        row("Scheduled install", f"firmware {scheduled['version']} at {scheduled['at_local']}{who}")


def _status(as_json: bool, out: TextIO) -> int:
    from upgrades.story import update_status

    status = update_status()
    if as_json:
        out.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
    else:
        _print_status(status, out)
    return EXIT_OK


def _check(as_json: bool, out: TextIO, err: TextIO) -> int:
    from upgrades import selectors, services
    from upgrades.models import CheckTrigger
    from upgrades.story import update_status

    result = services.update_check(trigger=CheckTrigger.CLI, user=cli_user())
    if as_json:
        out.write(json.dumps(update_status(), indent=2, sort_keys=True) + "\n")
    if not result.ok:
        err.write(f"update-control: {result.error}\n")
        return EXIT_FAILURE
    if not result.newest_available:
        if not as_json:
            installed = selectors.installed_version()
            out.write(f"No newer firmware is available (installed: {installed}).\n")
        return EXIT_NOTHING_TO_DO
    if not as_json:
        out.write(f"Firmware {result.newest_available} is available.\n")
    return EXIT_OK


def _download(out: TextIO, err: TextIO, quiet: bool) -> int:
    from jobs import leases
    from upgrades import downloader, services
    from upgrades.models import CheckTrigger, DownloadState, DownloadTrigger

    user = cli_user()
    checked = services.update_check(trigger=CheckTrigger.CLI, user=user)
    if not checked.ok:
        err.write(f"update-control: {checked.error}\n")
        return EXIT_FAILURE
    try:
        download = services.download_start(user=user, trigger=DownloadTrigger.CLI, enqueue=False)
    except (services.NothingToDownload, services.AlreadyReady) as exc:
        out.write(f"{exc}\n")
        return EXIT_NOTHING_TO_DO
    except services.UpdateError as exc:
        err.write(f"update-control: {exc}\n")
        return EXIT_FAILURE

    interrupted: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        if interrupted:  # a second Ctrl-C: stop at once (the lease lapses, a worker resumes)
            raise KeyboardInterrupt
        interrupted.append(time.monotonic())
        err.write("\nCancelling the download...\n")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = ProgressBar(err, enabled=not quiet)
    size = human_bytes(download.size)
    out.write(f"Downloading firmware {download.version} ({size}) from {download.url}\n")
    out.flush()
    try:
        state = downloader.download_execute(
            download.pk,
            executor=leases.executor_name("here"),
            on_progress=bar,
            should_cancel=lambda: bool(interrupted),
            user=user,
        )
    finally:
        bar.finish()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    download.refresh_from_db()
    if state == DownloadState.READY:
        out.write(f"Firmware {download.version} is ready to install.\n")
        return EXIT_OK
    if state == DownloadState.CANCELLED:
        err.write(f"update-control: the download of firmware {download.version} was cancelled.\n")
        return EXIT_FAILURE
    reason = download.error or state
    err.write(f"update-control: the download of firmware {download.version} failed: {reason}\n")
    return EXIT_FAILURE


def _preflight(as_json: bool, out: TextIO, err: TextIO) -> int:
    from upgrades.install import install_preflight
    from upgrades.install_status import check_dict

    checks = install_preflight(user=cli_user())
    ok = not any(check.status == "fail" for check in checks)
    if as_json:
        payload = {"ok": ok, "checks": [check_dict(check) for check in checks]}
        out.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    else:
        print_checks(checks, out)
    if not ok:
        if not as_json:
            err.write(f"update-control: the install is not possible: {failed_reason(checks)}\n")
        return EXIT_PREFLIGHT_FAILED
    if not as_json:
        pending = [check for check in checks if check.status == "pending"]
        if pending:
            out.write(f"No check failed; {len(pending)} wait for a downloaded firmware (WAIT).\n")
        else:
            out.write("Every check passed: the firmware can be installed.\n")
    return EXIT_OK


def _install(out: TextIO, err: TextIO, quiet: bool) -> int:
    from upgrades import install
    from upgrades.models import InstallTrigger
    from upgrades.story import Stage, update_story

    user = cli_user()
    story = update_story()
    if story.stage not in (Stage.INSTALLING, Stage.ROLLING_BACK) and story.ready_version is None:
        out.write(f"Nothing to install. {story.headline}\n")
        return EXIT_NOTHING_TO_DO
    checks = install.install_preflight(user=user)
    out.write("Preflight checks:\n")
    print_checks(checks, out)
    if any(check.status == "fail" for check in checks):
        err.write(f"update-control: the install is not possible: {failed_reason(checks)}\n")
        return EXIT_PREFLIGHT_FAILED
    try:
        run = install.install_start(user=user, trigger=InstallTrigger.CLI)
    except install.PreflightFailed as exc:
        err.write(f"update-control: the install is not possible: {exc}\n")
        return EXIT_PREFLIGHT_FAILED
    except install.NothingToInstall as exc:
        out.write(f"{exc}\n")
        return EXIT_NOTHING_TO_DO
    except install.InstallError as exc:
        err.write(f"update-control: {exc}\n")
        return EXIT_FAILURE
    return follow_started(
        run,
        f"Installing firmware {run.version} over {run.from_version or 'the installed firmware'}",
        out,
        err,
        quiet=quiet,
    )


def _schedule(at: str | None, out: TextIO, err: TextIO) -> int:
    """--at TIME (with -i fw): schedule the install, or move the pending one; --cancel-schedule:
    cancel it. The same service as the console's Install at (issue 18)."""
    from upgrades import schedule

    try:
        if at is None:
            done = schedule.schedule_cancel(user=cli_user())
            out.write(f"The install of firmware {done.version} at {schedule.local_text(done.at)} "
                      "is cancelled.\n")  # fmt: skip
            return EXIT_OK
        moment = schedule.parse_local(at)
        change = schedule.schedule_move if schedule.schedule_pending() else schedule.schedule_set
        done = change(at=moment, user=cli_user())
    except schedule.ScheduleRefused as exc:
        err.write(f"update-control: {exc}\n")
        return EXIT_FAILURE
    out.write(f"The install of firmware {done.version} is scheduled for "
              f"{schedule.local_text(done.at)}; update-control -s shows it.\n")  # fmt: skip
    return EXIT_OK


def _rehearse(as_json: bool, out: TextIO, err: TextIO, timeout: float | None = None) -> int:
    """--rehearse: start the rehearsal in the worker, wait for it, print its figures (issue 18)."""
    from jobs.models import FINAL_STATES, Job
    from upgrades import rehearsal

    try:
        job = rehearsal.rehearsal_start(user=cli_user(), trigger="cli")
    except rehearsal.RehearsalError as exc:
        err.write(f"update-control: {exc}\n")
        return EXIT_FAILURE
    if not as_json:
        out.write(f"{job.title}: the appliance keeps serving mail meanwhile.\n")
        out.flush()
    deadline = None if timeout is None else time.monotonic() + timeout
    while (job := Job.objects.get(pk=job.pk)).state not in FINAL_STATES:
        if deadline is not None and time.monotonic() > deadline:
            err.write("update-control: stopped waiting for the rehearsal (time limit).\n")
            return EXIT_DETACHED
        time.sleep(FOLLOW_INTERVAL)
    report = job.details.get("report") or {}
    if as_json:
        out.write(json.dumps(rehearsal.rehearsal_dict(job), indent=2, sort_keys=True) + "\n")
    elif job.state == "succeeded":
        estimate = report.get("estimate_s") or 0.0
        out.write(f"Mail held by the install: about {report['downtime_s']:.1f} s "
                  f"(preflight estimate: {estimate:.1f} s)\n")  # fmt: skip
        out.write(f"Conversion: {report['conversion_s']:.2f} s, {report['messages']} messages\n")
        for finding in report.get("warnings", []):
            out.write(f"  {finding['level']}: {finding['message']}\n")
        for item in report.get("diff", []):
            out.write(f"  {item['section']}: {item['name']} {item['change']}\n")
    if job.state != "succeeded":
        err.write(f"update-control: the rehearsal {job.state}: {job.error}\n")
        return EXIT_FAILURE
    return EXIT_OK


def _report(run_id: int | None, as_json: bool, out: TextIO, err: TextIO) -> int:
    """--report [RUN]: each check of the validation report with its outcome (issue 18)."""
    from upgrades import validation

    run, report = validation.report_of_run(run_id)
    if report is None:
        which = f"install run {run_id}" if run_id else "the last successful install"
        why = "there is no such run" if run_id and run is None else "it has no validation report"
        err.write(f"update-control: no report for {which}: {why}.\n")
        return EXIT_NOTHING_TO_DO
    dumped = json.dumps(report, indent=2, sort_keys=True)  # as stored (validationfile)
    out.write((dumped if as_json else validation.report_text(report)) + "\n")
    return EXIT_OK if report.get("passed") else EXIT_VALIDATION_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run update-control; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    reporting = args.report is not None
    if args.json and not (args.status or args.check or args.preflight or args.rehearse
                          or reporting):  # fmt: skip
        parser.print_usage(sys.stderr)
        sys.stderr.write("update-control: --json goes with -s, --check, --preflight, --rehearse "
                         "or --report\n")  # fmt: skip
        return EXIT_USAGE
    if args.at is not None and not args.install:
        parser.print_usage(sys.stderr)
        sys.stderr.write("update-control: --at goes with -i fw\n")
        return EXIT_USAGE
    setup_django()
    try:
        if args.at is not None or args.cancel_schedule:  # issue 18: install at a time
            return _schedule(args.at, sys.stdout, sys.stderr)
        if args.status:
            return _status(args.json, sys.stdout)
        if args.check:
            return _check(args.json, sys.stdout, sys.stderr)
        if args.preflight:
            return _preflight(args.json, sys.stdout, sys.stderr)
        if args.install:
            return _install(sys.stdout, sys.stderr, args.quiet)
        if args.rehearse:  # issue 18
            return _rehearse(args.json, sys.stdout, sys.stderr)
        if reporting:  # issue 18: the proof after the upgrade
            return _report(args.report or None, args.json, sys.stdout, sys.stderr)
        if args.go_back:  # issue 18: Return to the previous firmware
            from upgrades.return_cli import return_command

            return return_command(sys.stdout, sys.stderr, args.quiet)
        return _download(sys.stdout, sys.stderr, args.quiet)
    except KeyboardInterrupt:
        sys.stderr.write("\nupdate-control: interrupted\n")
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`update-control -s | head -3`): quiet, as other tools are. Its
        # output goes nowhere from here, so Python's flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
