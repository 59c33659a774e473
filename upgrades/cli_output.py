"""What update-control writes and how it follows a run: exit codes, bars, checklists.

Apart from upgrades.cli (the parser and its commands) so that a command kept in a module of
its own (upgrades.return_cli) writes and follows the same way without importing the tool that
dispatches to it.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Sequence
from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOTHING_TO_DO = 3
EXIT_PREFLIGHT_FAILED = 4
EXIT_ROLLED_BACK = 5
EXIT_INSTALL_FAILED = 6
EXIT_ABORTED = 7
EXIT_VALIDATION_FAILED = 8  # --report: a check of the validation report failed
EXIT_DETACHED = 130
BAR_WIDTH = 30


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def human_duration(seconds: int | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Draws the download on a terminal (one redrawn line), or every 10% when not a terminal."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.last_step: tuple[str, int] | None = None
        self.drawn = False

    def __call__(self, download: Any) -> None:
        if not self.enabled:
            return
        if download.state in ("verifying", "ready"):
            label = "Verifying  " if download.state == "verifying" else "Verified   "
            percent = download.verify_percent if download.state == "verifying" else 100.0
            detail = f"{human_bytes(download.size)}"
        else:
            label, percent = "Downloading", download.percent
            rate = f"{human_bytes(download.rate)}/s" if download.rate else "-- /s"
            detail = (
                f"{human_bytes(download.bytes_done)} of {human_bytes(download.size)}  {rate}  "
                f"ETA {human_duration(download.eta_seconds)}"
            )
        filled = int(BAR_WIDTH * percent / 100)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"{label} {download.version} [{bar}] {percent:5.1f}%  {detail}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
            self.drawn = True
            return
        step = (label, int(percent // 10))
        if step != self.last_step:
            self.last_step = step
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def cli_user() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "root"
    return f"{name} (update-control)"


STATUS_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "pending": "WAIT"}
# How often the follower re-reads the run (one indexed row and its ten phases): the phases write
# progress a few times a second, and the shell returns within this much of the run's end.
FOLLOW_INTERVAL = 0.2


def print_checks(checks: Sequence[Any], out: TextIO) -> None:
    """One block per check: the verdict, what was measured, and what to do about it."""
    for check in checks:
        mark = STATUS_MARK.get(check.status, check.status.upper())
        out.write(f"[{mark}] {check.title}: {check.value}\n")
        if check.advice and check.status != "pass":
            out.write(f"       {check.advice}\n")
        for detail in check.details:
            out.write(f"       - {detail}\n")


def failed_reason(checks: Sequence[Any]) -> str:
    failed = [check for check in checks if check.status == "fail"]
    return "; ".join(f"{check.title}: {check.value}" for check in failed)


class PhaseDisplay:
    """The ten phases with their state and percentage.

    On a terminal the block of lines is redrawn in place; otherwise (a log, a pipe) a line is
    written each time a phase changes state or passes another 10%, so the output reads as a log.
    """

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.drawn_lines = 0
        self.seen: dict[int, tuple[str, int]] = {}

    @staticmethod
    def line(phase: Any) -> str:
        percent = phase.percent
        filled = int(20 * percent / 100)
        bar = "#" * filled + "." * (20 - filled)
        label = phase.get_state_display()
        text = f"Phase {phase.number:>2}/10 {phase.name[:52]:<52} [{bar}] {percent:5.1f}% {label}"
        if phase.message and phase.state == "running":
            text += f"  {phase.message[:60]}"
        return text

    def __call__(self, run: Any, phases: Sequence[Any]) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.drawn_lines:
                self.stream.write(f"\x1b[{self.drawn_lines}F")
            lines = [self.line(phase) for phase in phases]
            elapsed = human_duration(round(run.elapsed_seconds or 0))
            lines.append(f"{run.get_state_display()} firmware {run.version}, elapsed {elapsed}")
            for text in lines:
                self.stream.write("\x1b[2K" + text[:160] + "\n")
            self.drawn_lines = len(lines)
            self.stream.flush()
            return
        for phase in phases:
            step = (str(phase.state), int(phase.percent // 10))
            if phase.state == "pending" or self.seen.get(phase.number) == step:
                continue
            self.seen[phase.number] = step
            self.stream.write(self.line(phase) + "\n")
        self.stream.flush()


def _the_run(run: Any) -> str:
    """ "the install of firmware X" or "the return to firmware X", as every message names it."""
    return f"the {'return to' if run.is_return else 'install of'} firmware {run.version}"


def outcome(run: Any, out: TextIO, err: TextIO) -> int:
    from upgrades.models import InstallState

    if run.state == InstallState.SUCCEEDED:
        downtime = run.downtime_seconds
        note = f" (mail was held for {downtime:.1f} s)" if downtime is not None else ""
        done = "Return complete" if run.is_return else "Upgrade complete"  # issue 18
        out.write(f"{done}: firmware {run.version}{note}.\n")
        return EXIT_OK
    reason = run.error or "no reason was recorded"
    what = _the_run(run)
    if run.state == InstallState.ROLLED_BACK:
        err.write(
            f"update-control: {what} failed and was rolled back; "
            f"the appliance is as it was before: {reason}\n"
        )
        return EXIT_ROLLED_BACK
    if run.state == InstallState.ABORTED:
        err.write(f"update-control: {what} was aborted: {reason}\n")
        return EXIT_ABORTED
    err.write(
        f"update-control: {what} failed and could not be rolled back; it needs attention: "
        f"{reason}\n"
    )
    return EXIT_INSTALL_FAILED


def follow_install(
    run_id: int, out: TextIO, err: TextIO, *, quiet: bool = False, timeout: float | None = None
) -> int:
    """Show the run's phases until it ends; returns the exit code of its outcome."""
    from upgrades.models import INSTALL_ACTIVE_STATES, InstallRun

    display = PhaseDisplay(out, enabled=not quiet)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = InstallRun.objects.get(pk=run_id)
        phases = list(run.phases.order_by("number"))
        display(run, phases)
        if run.state not in INSTALL_ACTIVE_STATES:
            return outcome(run, out, err)
        if deadline is not None and time.monotonic() > deadline:
            err.write("update-control: stopped following the install (time limit).\n")
            return EXIT_DETACHED
        time.sleep(FOLLOW_INTERVAL)


def follow_started(run: Any, started: str, out: TextIO, err: TextIO, *, quiet: bool) -> int:
    """Say what started (``started``: "Installing firmware X over Y") and where the console
    shows it, then follow it; Ctrl-C detaches and the run goes on. One way for -i fw and
    --return, which differ only in what they start."""
    from django.urls import reverse

    page = reverse("upgrades:install_run", args=[run.pk])
    out.write(f"{started} (run {run.pk}; also shown in the console at {page}).\n")
    out.flush()
    try:
        return follow_install(run.pk, out, err, quiet=quiet)
    except KeyboardInterrupt:
        err.write(
            f"\nupdate-control: detached; {_the_run(run)} goes on in the background. Follow it "
            f"with update-control -s or in the console at {page}.\n"
        )
        return EXIT_DETACHED
