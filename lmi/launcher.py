"""`make run`: set the console up and serve it with its workers; Ctrl-C stops everything.

    python -m lmi.launcher setup   # migrate, first administrator, demo appliance, static files
    python -m lmi.launcher run     # setup, then Redis (if needed), gunicorn, worker, beat and
                                   # the mail processing service (SMTP)

`run` supervises what it starts: a child that dies is restarted after 1 s, then 2, 4, 8 ... up
to 30 s while it keeps dying within a minute of its start, with a warning event (System >
Events) for each death. Nothing else stops with it: the SMTP service keeps taking mail while
the broker or the worker is down. "LMI is serving" is printed once /healthz answers 200 (the
database, Redis and the worker all up), not when the processes have merely been started.

Ctrl-C, SIGTERM or SIGHUP stops everything in order (STOP_STAGES): the web server, the SMTP
service and beat; then the worker (a warm shutdown: its running task finishes; after 15 s, or
at a second Ctrl-C, a cold one that hands the task back to the queue; SIGKILL if even that
hangs); Redis last, since the others talk to it while they stop. The children run in sessions
of their own, so a signal for the launcher's process group (a terminal's Ctrl-C, `kill -TERM
-PGID`, make passing on its SIGTERM) reaches the launcher only, and the order holds. On Linux
each child also dies with the launcher when it is killed outright (SIGKILL, the OOM killer),
Redis included: nothing is left running as an orphan.

Everything here is process plumbing; what the steps do lives in management commands.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
# Until /healthz first answers 200 the launcher asks it this often; after HEALTH_NOTE_SECONDS
# without a 200 it says so (with the login) instead of waiting in silence.
HEALTH_POLL_SECONDS = 0.1
HEALTH_NOTE_SECONDS = 60.0
# How each child is stopped: a signal, the time it has to exit, then the next; SIGKILL after
# the last. The worker's SIGTERM is Celery's warm shutdown (its running task finishes); its
# SIGQUIT a cold one that hands the task back to the queue (acks late) instead of running it
# to its end; even a task lost to the SIGKILL is resumed by the job engine's reconciler.
STOP_STEPS: dict[str, tuple[tuple[signal.Signals, float], ...]] = {
    "web": ((signal.SIGTERM, 12.0),),  # gunicorn's --graceful-timeout is 10 s
    "smtp": ((signal.SIGTERM, 10.0),),
    "beat": ((signal.SIGTERM, 5.0),),
    "worker": ((signal.SIGTERM, 15.0), (signal.SIGQUIT, 10.0)),
    "redis": ((signal.SIGTERM, 10.0),),
}
STOP_STAGES = (("web", "smtp", "beat"), ("worker",), ("redis",))
STOP_NOTE_SECONDS = 5.0  # an idle console stops in about 3 s; longer, and we say what we wait for
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = logging.getLogger("lmi.launcher")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
    env["PYTHONUNBUFFERED"] = "1"
    # Django's system checks run once, in setup(); Celery's worker and beat would run them all
    # again (importing every URL, view and the API: 0.27 s of each start and restart).
    env["CELERY_SKIP_CHECKS"] = "1"
    return env


def setup(env: dict[str, str]) -> str:
    """Idempotent: a second run changes nothing that is already in place.

    Run in this process (one Django start instead of four, about 2 s of every start), with the
    settings the children will have; its database connections are closed before they start.
    Returns what ensure_admin said when it created the administrator ("" when users exist), so
    `run` can show a generated password next to the URL instead of above a screenful of
    start-up logs. Each step costs milliseconds when there is nothing to do (collectstatic
    compares modification times and copies nothing).
    """
    os.environ.update(env)
    import django
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    # Once for every child (see _env): an error stops the start here, a warning is printed.
    call_command("check", stdout=io.StringIO())
    call_command("migrate", interactive=False, verbosity=0)
    admin = io.StringIO()
    call_command("ensure_admin", stdout=admin)
    call_command("init_appliance")
    call_command("collectstatic", interactive=False, verbosity=0)
    connections.close_all()
    said = admin.getvalue().strip()
    return said if said.startswith("Created") else ""


def _say(text: str) -> None:
    """Print for the person at the terminal; a terminal that is gone (SIGHUP) is no error."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def _die_with_launcher(death_signal: int, niceness: int = 0) -> Callable[[], None] | None:
    """A preexec_fn: the child gets death_signal when the launcher dies, however it dies.

    Linux's PR_SET_PDEATHSIG; elsewhere there is none and a killed launcher leaves orphans. It
    fires when the thread that started the child ends: the launcher starts every child from its
    main thread. libc is looked up here, before the fork: the child only calls it.
    """
    linux = sys.platform.startswith("linux")
    prctl = ctypes.CDLL(None, use_errno=True).prctl if linux else None
    launcher = os.getpid()

    def preexec() -> None:
        if prctl is not None:
            if prctl(PR_SET_PDEATHSIG, death_signal) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
            if os.getppid() != launcher:  # the launcher died before the prctl took effect
                os.kill(os.getpid(), death_signal)
        if niceness:
            os.nice(niceness)

    return preexec if linux or niceness else None


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
            # SIGTERM: it writes its append-only file out and exits in milliseconds.
            preexec_fn=_die_with_launcher(signal.SIGTERM),
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


def _stop_together(group: list[Child], hurries: Callable[[], int]) -> None:
    """Take each child through its STOP_STEPS at once; return when all of them are gone.

    A step ends when its time is up or when Ctrl-C is pressed again (hurries() grows; a Ctrl-C
    pressed while an earlier stage stopped counts too); then the next step's signal is sent,
    and after the last one SIGKILL. Never Redis's: it stops in milliseconds, and a SIGKILL
    would lose the last second of its append-only file (the tasks the worker just handed back).
    """
    pending: dict[str, tuple[Child, int, float, int]] = {}  # name: child, step, deadline, hurries
    for child in group:
        if child.process is not None and child.process.poll() is None:
            sent, seconds = STOP_STEPS[child.name][0]
            child.process.send_signal(sent)
            pending[child.name] = (child, 0, time.monotonic() + seconds, 0)
    started = time.monotonic()
    noted = False
    while pending:
        now = time.monotonic()
        for name, (child, step, deadline, seen) in list(pending.items()):
            assert child.process is not None
            if child.process.poll() is not None:
                del pending[name]
            elif now >= deadline or (hurries() != seen and name != "redis"):
                steps = STOP_STEPS[name]
                if step + 1 < len(steps):
                    sent, seconds = steps[step + 1]
                    child.process.send_signal(sent)
                    pending[name] = (child, step + 1, now + seconds, hurries())
                else:
                    child.process.kill()
                    child.process.wait()
                    del pending[name]
                    _say(f"The {child.label} did not stop in time: killed it.")
        if not noted and pending and now - started >= STOP_NOTE_SECONDS:
            noted = True
            waiting = ", ".join(child.label for child, *_ in pending.values())
            _say(f"Still stopping: {waiting} (Ctrl-C again to hurry).")
        time.sleep(0.05)
    for child in group:
        # What it leaves in its group (gunicorn's workers, the worker's pool) goes with it.
        if child.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)


def _stop(children: list[Child], hurries: Callable[[], int]) -> None:
    """Stop stage by stage (STOP_STAGES), each stage gone before the next is asked.

    The web server and the SMTP service first, so no new work comes in, and beat, so nothing
    more is scheduled: together, as none of them needs another (in series their waits would
    add about 2 s). Then the worker, which finishes or hands back what it holds. Redis last:
    until then the others still talk to it, and each would log an error for every retry.
    """
    by_name = {child.name: child for child in children}
    for stage in STOP_STAGES:
        _stop_together([by_name[name] for name in stage if name in by_name], hurries)


# Our own server: never through a proxy named in the environment (http_proxy).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _health(url: str) -> tuple[int, str]:
    """The status and body of /healthz, (0, reason) while nothing answers."""
    try:
        with _DIRECT.open(url, timeout=3) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def _banner(headline: str, admin: str, smtp_address: str) -> str:
    """What a person needs to start: the URL, how to log in, where mail goes, how to stop.

    The administrator created by this start (and its generated password) is named here, below
    the children's start-up logs, rather than above them.
    """
    if admin:
        login = f"  {admin}"
    else:
        login = (
            "  Log in as 'admin' (password: LMI_ADMIN_PASSWORD, or the one printed when it was "
            "created)."
        )
    return (
        f"\n{headline}\n{login}\n"
        f"  The mail processing service accepts SMTP on {smtp_address}. Ctrl-C stops "
        "everything.\n"
    )


def _commands(env: dict[str, str], host: str, port: str) -> dict[str, list[str]]:
    return {
        # The worker first: it is the slowest to be ready and /healthz waits for it.
        "worker": [
            str(BIN / "celery"), "-A", "lmi", "worker",
            "--loglevel", "INFO",
            "--concurrency", env.get("LMI_WORKER_CONCURRENCY", "2"),
            "--hostname", f"worker@{env.get('LMI_NODE_NAME', 'central')}",
            # In a cluster the worker consumes its node's queue (lmi.node.<name>); standalone
            # keeps the one queue (LMI_CELERY_QUEUE, "lmi").
            "--queues", _worker_queue(env),
            # Their auto-delete queues make the worker exit when the broker restarts (see
            # CELERY_CONTROL_QUEUE_DURABLE in lmi/settings.py); the console uses neither.
            "--without-gossip",
            "--without-mingle",
        ],
        "web": [
            str(BIN / "gunicorn"), "lmi.wsgi:application",
            "--bind", f"{host}:{port}",
            "--workers", env.get("LMI_WEB_WORKERS", "2"),
            "--threads", "4",
            # Django is loaded once, in the master, and its workers are forks: one Django start
            # instead of one per worker (about 1 s of CPU) on every start and restart.
            "--preload",
            "--access-logfile", "-",
            "--graceful-timeout", "10",
        ],
        # The mail processing service, on LMI_SMTP_HOST:LMI_SMTP_PORT (127.0.0.1:2525).
        "smtp": [sys.executable, str(BASE_DIR / "manage.py"), "smtp_service"],
        "beat": [
            str(BIN / "celery"), "-A", "lmi", "beat",
            "--loglevel", "INFO",
            "--schedule", str(_var_dir(env) / "celerybeat-schedule"),
        ],
    }  # fmt: skip


LABELS = {
    "web": "web server",
    "worker": "Celery worker",
    "beat": "Celery beat",
    "smtp": "mail processing service (SMTP)",
}
# Beat runs at a lower priority: it is idle but for a message every few seconds, and while the
# others load Django it would take a third of the CPU the console needs to answer /healthz.
NICENESS = {"beat": 10}


def run() -> int:
    env = _env()
    children: list[Child] = []
    redis_child: Child | None = None
    run_dir, data_dir = _var_dir(env) / "run", _var_dir(env) / "redis"
    if not env.get("LMI_REDIS_URL"):
        redis_child = Child("redis", "private Redis", lambda: _start_redis(run_dir, data_dir))
        env["LMI_REDIS_URL"] = f"unix://{run_dir / 'redis.sock'}"
        children.append(redis_child)
    host = env.get("LMI_BIND", "127.0.0.1")
    port = env.get("LMI_PORT", "8000")
    local = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    url = f"http://{local}:{port}/"
    smtp_address = f"{env.get('LMI_SMTP_HOST') or '127.0.0.1'}:{env.get('LMI_SMTP_PORT') or 2525}"

    def starter(command: list[str], name: str) -> Callable[[], subprocess.Popen[bytes]]:
        # Own sessions: a signal for our process group (Ctrl-C) reaches us only, and we stop
        # the children in order. SIGKILL if we die: they are in no state to stop in order then.
        return lambda: subprocess.Popen(
            command, cwd=BASE_DIR, env=env, start_new_session=True,
            preexec_fn=_die_with_launcher(signal.SIGKILL, NICENESS.get(name, 0)),
        )  # fmt: skip

    services = [
        Child(name, LABELS[name], starter(command, name))
        for name, command in _commands(env, host, port).items()
    ]
    children.extend(services)
    stopping = False
    hurries = 0
    admin = ""
    shown = False  # the banner (with a generated password) has been printed

    def stop(number: int, _: object) -> None:
        """The first signal stops; each further Ctrl-C hurries the stop along. A repeated
        SIGTERM (make forwards its own to us) changes nothing."""
        nonlocal stopping, hurries
        if stopping and number == signal.SIGINT:
            hurries += 1
        stopping = True

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    try:
        # Until the children start, any of the three interrupts setup (a migration rolls back).
        for number in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, interrupt)
        # Redis loads its append-only file while this process sets the console up.
        if redis_child is not None:
            redis_child.launch()
        # This process also writes the restart events: the same settings as its children.
        admin = setup(env)
        # From here on a signal asks for the orderly stop below (before: KeyboardInterrupt).
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, stop)
        if redis_child is not None:
            assert redis_child.process is not None
            _wait_for_redis(redis_child.process, run_dir / "redis.sock")
            _say(f"Started a private Redis on {run_dir / 'redis.sock'}")
        for child in services:
            child.launch()
        started = time.monotonic()
        serving = False
        while not stopping:
            _supervise(children)
            if serving:
                time.sleep(POLL_SECONDS)
                continue
            status, body = _health(f"{url}healthz")
            if status == 200:
                _say(_banner(f"LMI is serving on {url}", admin, smtp_address))
                serving = shown = True
            elif not shown and time.monotonic() - started > HEALTH_NOTE_SECONDS:
                headline = f"LMI is not healthy yet: {url}healthz answers {status} {body.strip()}"
                _say(_banner(headline, admin, smtp_address))
                shown = True
            time.sleep(HEALTH_POLL_SECONDS)
    except KeyboardInterrupt:
        return 130  # stopped during setup; the finally still stops what was started
    finally:
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, stop)
        _stop(children, hurries=lambda: hurries)
        if admin and not shown:
            _say(admin)  # stopped before the banner: a generated password must not go unseen
        _say("LMI stopped.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lmi.launcher")
    parser.add_argument("command", choices=["setup", "run"])
    args = parser.parse_args()
    if args.command == "setup":
        admin = setup(_env())
        if admin:
            print(admin)
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main())
