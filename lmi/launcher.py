"""`make run`: set the console up and serve it with its workers; Ctrl-C stops everything.

    python -m lmi.launcher setup   # migrate, first administrator, demo appliance, static files
    python -m lmi.launcher run     # setup, then Redis (if needed), gunicorn, worker, beat and
                                   # the mail processing service (SMTP)

`run` supervises what it starts: a child that dies is restarted after 1 s, then 2, 4, 8 ... up
to 30 s while it keeps dying within a minute of its start, with a warning event (System >
Events) for each death. Nothing else stops with it: the SMTP service keeps taking mail while
the broker or the worker is down. Only Ctrl-C or SIGTERM stops everything.

Everything here is process plumbing; what the steps do lives in management commands.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A dead child waits BACKOFF_FIRST before its restart, twice as long after each further quick
# death, at most BACKOFF_MAX; one that ran STEADY_SECONDS before dying starts again at the first.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STEADY_SECONDS = 60.0
POLL_SECONDS = 0.25
REDIS_START_TIMEOUT = 30.0  # a long append-only file takes a while to load

log = logging.getLogger("lmi.launcher")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def setup(env: dict[str, str]) -> None:
    """Idempotent: a second run changes nothing that is already in place.

    Run in this process (one Django start instead of four, about 2 s of every start), with the
    settings the children will have; its database connections are closed before they start.
    """
    os.environ.update(env)
    import django
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    call_command("ensure_admin")
    call_command("init_appliance")
    call_command("collectstatic", interactive=False, verbosity=0)
    connections.close_all()


def _var_dir(env: dict[str, str]) -> Path:
    raw = env.get("LMI_VAR_DIR", "")
    return Path(raw).resolve() if raw else BASE_DIR / "var"


def _worker_queue(env: dict[str, str]) -> str:
    """The queue this node's worker consumes (the same rule as lmi/settings.py)."""
    role = (env.get("LMI_CLUSTER_ROLE") or "standalone").strip().lower()
    if role in ("central", "member"):
        return f"lmi.node.{env.get('LMI_NODE_NAME') or 'central'}"
    return env.get("LMI_CELERY_QUEUE") or "lmi"


def _redis_command(run_dir: Path, data_dir: Path) -> list[str]:
    """The private Redis: a unix socket under var/run, no port to collide with.

    Its data (the queue, delayed and unacknowledged tasks) is kept in an append-only file under
    var/redis, written to disk every second, so a restart of the server loses at most that.
    """
    from lmi.redisserver import redis_server_binary

    return [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", str(run_dir / "redis.sock"),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--dir", str(data_dir),
    ]  # fmt: skip


def _start_redis(run_dir: Path, data_dir: Path) -> subprocess.Popen[bytes]:
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    # A socket left by a killed server would make the new one refuse to start.
    (run_dir / "redis.sock").unlink(missing_ok=True)
    with (run_dir / "redis.log").open("ab") as redis_log:
        return subprocess.Popen(
            _redis_command(run_dir, data_dir),
            stdout=redis_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_redis(process: subprocess.Popen[bytes], socket_path: Path) -> None:
    """Return once the server answers PING: the worker and beat need it from their start."""
    import redis

    deadline = time.monotonic() + REDIS_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {process.returncode}; see {socket_path.parent}/redis.log"
            )
        with contextlib.suppress(redis.RedisError):
            if redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping():
                return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer within {REDIS_START_TIMEOUT:.0f} s")


@dataclass
class Child:
    """A process the launcher keeps running: restarted, with backoff, whenever it dies."""

    name: str
    label: str
    start: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each within STEADY_SECONDS of its start
    restart_at: float | None = None  # set while it is dead and waits for its restart

    def launch(self) -> subprocess.Popen[bytes]:
        # A start that fails counts as a start that died at once: its backoff keeps growing.
        self.started_at = time.monotonic()
        self.restart_at = None
        self.process = self.start()
        return self.process

    def schedule_restart(self, now: float) -> float:
        """Note that the child died; return how long it waits before it is started again."""
        if now - self.started_at >= STEADY_SECONDS:
            self.quick_deaths = 0
        delay = min(BACKOFF_FIRST * 2**self.quick_deaths, BACKOFF_MAX)
        self.quick_deaths += 1
        self.restart_at = now + delay
        return delay


def _ending(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _record_death(child: Child, pid: int, returncode: int, delay: float) -> None:
    """A warning event for System > Events (event_write mirrors it to the log)."""
    from django.db import connections

    from events.models import Category, Severity
    from events.services import event_write

    message = f"The {child.label} {_ending(returncode)}; restarting it in {delay:g} s"
    try:
        event_write(
            category=Category.SYSTEM,
            severity=Severity.WARNING,
            message=message,
            user="launcher",
            details={
                "process": child.name,
                "pid": pid,
                "exit_code": returncode,
                "restart_in_seconds": delay,
                "deaths_in_a_row": child.quick_deaths,
            },
        )
    except Exception:
        # The database may be what is down: the restart matters more than its record.
        log.exception("event not written: %s", message)
    finally:
        connections.close_all()


def _supervise(children: list[Child]) -> None:
    """One look at every child: note the ones that died, restart those whose wait is over."""
    for child in children:
        now = time.monotonic()
        if child.restart_at is not None:
            if now < child.restart_at:
                continue
            try:
                process = child.launch()
            except (OSError, RuntimeError) as exc:
                log.error("could not restart the %s: %s", child.label, exc)
                child.schedule_restart(now)
                continue
            log.warning("restarted the %s (pid %d)", child.label, process.pid)
        elif child.process is not None and child.process.poll() is not None:
            # Its own children (gunicorn's workers, the worker's pool) go with it: the restart
            # finds the port free and no orphan left consuming.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
            delay = child.schedule_restart(now)
            _record_death(child, child.process.pid, child.process.returncode, delay)


def _stop(children: list[Child], timeout: float = 15.0) -> None:
    running = [c.process for c in children if c.process is not None and c.process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run() -> int:
    env = _env()
    children: list[Child] = []
    redis_child: Child | None = None
    run_dir, data_dir = _var_dir(env) / "run", _var_dir(env) / "redis"
    if not env.get("LMI_REDIS_URL"):
        redis_child = Child("redis", "private Redis", lambda: _start_redis(run_dir, data_dir))
        env["LMI_REDIS_URL"] = f"unix://{run_dir / 'redis.sock'}"
        children.append(redis_child)
    # This process also writes the restart events: the same settings as its children.
    setup(env)
    host = env.get("LMI_BIND", "127.0.0.1")
    port = env.get("LMI_PORT", "8000")
    commands = {
        "web": [
            str(BIN / "gunicorn"),
            "lmi.wsgi:application",
            "--bind",
            f"{host}:{port}",
            "--workers",
            env.get("LMI_WEB_WORKERS", "2"),
            "--threads",
            "4",
            "--access-logfile",
            "-",
            "--graceful-timeout",
            "10",
        ],
        "worker": [
            str(BIN / "celery"),
            "-A",
            "lmi",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            env.get("LMI_WORKER_CONCURRENCY", "2"),
            "--hostname",
            f"worker@{env.get('LMI_NODE_NAME', 'central')}",
            # In a cluster the worker consumes its node's queue (lmi.node.<name>); standalone
            # keeps the one queue (LMI_CELERY_QUEUE, "lmi").
            "--queues",
            _worker_queue(env),
            # Their auto-delete queues make the worker exit when the broker restarts (see
            # CELERY_CONTROL_QUEUE_DURABLE in lmi/settings.py); the console uses neither.
            "--without-gossip",
            "--without-mingle",
        ],
        "beat": [
            str(BIN / "celery"),
            "-A",
            "lmi",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(_var_dir(env) / "celerybeat-schedule"),
        ],
        # The mail processing service, on LMI_SMTP_HOST:LMI_SMTP_PORT (127.0.0.1:2525).
        "smtp": [sys.executable, str(BASE_DIR / "manage.py"), "smtp_service"],
    }
    labels = {
        "web": "web server",
        "worker": "Celery worker",
        "beat": "Celery beat",
        "smtp": "mail processing service (SMTP)",
    }

    def starter(command: list[str]) -> Callable[[], subprocess.Popen[bytes]]:
        # Own process groups: Ctrl-C reaches us only, and we stop the children in order.
        return lambda: subprocess.Popen(command, cwd=BASE_DIR, env=env, start_new_session=True)

    services = [Child(name, labels[name], starter(command)) for name, command in commands.items()]
    children.extend(services)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if redis_child is not None:
            _wait_for_redis(redis_child.launch(), run_dir / "redis.sock")
            print(f"Started a private Redis on {run_dir / 'redis.sock'}")
        for child in services:
            child.launch()
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"  # noqa: S104
        smtp_address = (
            f"{env.get('LMI_SMTP_HOST') or '127.0.0.1'}:{env.get('LMI_SMTP_PORT') or 2525}"
        )
        print(
            f"\nLMI is serving on {url}\n  Log in as 'admin' (password: LMI_ADMIN_PASSWORD, or "
            "the one printed above when it was created). Ctrl-C stops everything.\n"
            f"  The mail processing service accepts SMTP on {smtp_address}.\n",
            flush=True,
        )
        while not stopping:
            _supervise(children)
            time.sleep(POLL_SECONDS)
    finally:
        _stop(services)
        # Redis last: a stopping worker still hands its unacknowledged messages back to it.
        if redis_child is not None:
            _stop([redis_child], timeout=10)
        print("LMI stopped.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lmi.launcher")
    parser.add_argument("command", choices=["setup", "run"])
    args = parser.parse_args()
    if args.command == "setup":
        setup(_env())
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main())
