"""Run each bench at a tiny size and fail unless it ends well and prints its JSON line.

    .venv/bin/python scripts/bench_smoke.py "bench/download.py --size-mb 16 --json" ...

`make bench-smoke` calls this with every script in bench/. The benches are not part of the test
suite, so nothing else notices when one stops running (a renamed function, a changed id); here
a bench fails if it exits non-zero, takes longer than --timeout, or prints no line that is a
JSON object whose "bench" key names the script: a bench that "ran" but measured nothing counts
as broken too. `--jobs N` runs N at once (CI: one per core): at these sizes a bench proves
that it runs, not how fast, so sharing the CPU costs nothing but figures nobody reads; the
full-size `make bench` runs them one after the other. Every script in bench/ (but _helpers)
must be among the commands, so a new bench cannot be left out. The JSON lines go to stdout;
progress, and a failed bench's output, to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
TAIL_LINES = 40


def json_lines(stdout: str, bench: str) -> list[str]:
    """The lines of stdout that are a JSON object with "bench": bench."""
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("bench") == bench:
            found.append(line)
    return found


def stop_group(process: subprocess.Popen[str]) -> None:
    """End the bench and what it started (its own process group): TERM first, so it can clean
    up its services and temporary files, then KILL."""
    for sig, grace in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(command: str, timeout: float) -> tuple[bool, str, float]:
    """(passed, the JSON line or the reason it failed, seconds) for one bench command line."""
    argv = shlex.split(command)
    bench = Path(argv[0]).stem
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *argv],
        cwd=BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, to end its services on a timeout
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        stdout, stderr = process.communicate()
        return False, _failure(f"took longer than {timeout:.0f} s", stdout, stderr), timeout
    seconds = time.monotonic() - started
    if process.returncode != 0:
        return False, _failure(f"exited with {process.returncode}", stdout, stderr), seconds
    lines = json_lines(stdout, bench)
    if len(lines) != 1:
        reason = f'printed {len(lines)} JSON lines with "bench": "{bench}", not one'
        return False, _failure(reason, stdout, stderr), seconds
    return True, lines[0], seconds


def _failure(reason: str, stdout: str, stderr: str) -> str:
    parts = [reason]
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        tail = text.splitlines()[-TAIL_LINES:]
        if tail:
            parts.append(f"--- last {len(tail)} lines of its {name}:")
            parts.extend(tail)
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "commands", nargs="+", help='a bench command line, e.g. "bench/x.py --json"'
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per bench")
    parser.add_argument("--jobs", type=int, default=1, help="how many benches run at once")
    args = parser.parse_args()

    given = {(BASE_DIR / shlex.split(command)[0]).resolve() for command in args.commands}
    missing = sorted(
        path.relative_to(BASE_DIR)
        for path in (BASE_DIR / "bench").glob("*.py")
        if not path.name.startswith("_") and path.resolve() not in given
    )
    if missing:
        print(f"bench-smoke: no command for {', '.join(map(str, missing))}", file=sys.stderr)
        return 1

    began = time.monotonic()
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        running = {
            pool.submit(run_one, command, args.timeout): command for command in args.commands
        }
        for future in as_completed(running):
            command = running[future]
            passed, output, seconds = future.result()
            if passed:
                print(output, flush=True)
                print(
                    f"bench-smoke: ok     {seconds:6.1f} s  {command}", file=sys.stderr, flush=True
                )
            else:
                failed.append(command)
                print(f"bench-smoke: FAILED {seconds:6.1f} s  {command}", file=sys.stderr)
                print(output, file=sys.stderr, flush=True)
    total = time.monotonic() - began
    summary = f"{len(args.commands) - len(failed)} of {len(args.commands)} benches passed"
    print(f"bench-smoke: {summary} in {total:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
