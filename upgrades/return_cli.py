"""update-control --return: Return to the previous firmware from the shell (issue 18).

Like ``-i fw``: the checks first, then the return starts in the console's worker and this tool
follows its ten phases until it ends (Ctrl-C detaches; the return goes on). Exit codes as for
an install: 0 returned, 1 refused or failed to start, 3 nothing to return to (no upgrade, or
its retention period is over), 4 a check failed, 5 failed and rolled back (the newer firmware
runs as before), 6 failed and could not roll back, 7 aborted, 130 detached.
"""

from __future__ import annotations

from typing import TextIO


def return_command(out: TextIO, err: TextIO, quiet: bool) -> int:
    """Check, start and follow the return; the exit code of its outcome."""
    from upgrades import cli_output as cli
    from upgrades import install, returning
    from upgrades.models import InstallTrigger

    way = returning.return_available()
    if not way.available:
        target = f" to firmware {way.target}" if way.target else ""
        out.write(f"Nothing to return to: a return{target} is not possible: {way.reason}.\n")
        return cli.EXIT_NOTHING_TO_DO
    checks = returning.return_preflight(way)
    out.write(f"Checks of the return to firmware {way.target} (possible until {way.until_text}):\n")
    cli.print_checks(checks, out)
    if any(check.status == "fail" for check in checks):
        err.write(f"update-control: the return is not possible: {cli.failed_reason(checks)}\n")
        return cli.EXIT_PREFLIGHT_FAILED
    try:
        run = returning.return_start(user=cli.cli_user(), trigger=InstallTrigger.CLI)
    except returning.NothingToReturn as exc:
        out.write(f"{exc}\n")
        return cli.EXIT_NOTHING_TO_DO
    except returning.ReturnRefused as exc:
        err.write(f"update-control: {exc}\n")
        return cli.EXIT_PREFLIGHT_FAILED
    except install.InstallError as exc:
        err.write(f"update-control: {exc}\n")
        return cli.EXIT_FAILURE
    return cli.follow_started(
        run, f"Returning to firmware {run.version} from {run.from_version}", out, err, quiet=quiet
    )
