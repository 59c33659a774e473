"""`python -m lmi.launcher run` as a subprocess, for the supervision tests.

The launcher is started exactly as `make run` starts it, on free ports, with its own var/ (so
its own private Redis on a unix socket there), pointed at the test database and the test's
appliance root through the same LMI_* variables production uses. Its children are found by
their command lines; tests kill them as a crash would and watch the launcher bring them back.

Import the fixture into a test module (``from tests.support.launcher import launcher  # noqa:
F401``).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis

from lmi.celery import app as celery_app
from tests.support.services import BASE_DIR, wait_for, worker_env
from tests.support.smtp import free_port, read_banner

START_TIMEOUT = 60.0  # setup (migrate, demo appliance, static files), then every child
STOP_TIMEOUT = 40.0
WORKER_HOSTNAME = "worker@central"


def _child_name(command: list[str]) -> str:
    """Which of the launcher's children a command line is ("" for none of them)."""
    words = " ".join(command)
    if "redis-server" in words:
        return "redis"
    if "gunicorn" in words:
        return "web"
    if "smtp_service" in words:
        return "smtp"
    if "celery" in words and " worker" in words:
        return "worker"
    if "celery" in words and " beat" in words:
        return "beat"
    return ""


@dataclass
class LauncherProcess:
    """A running launcher: its log, its children, and how to reach its Redis and SMTP service."""

    var_dir: Path
    appliance_root: Path
    port: int = field(default_factory=free_port)
    smtp_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # More LMI_* settings for every child (an install's test pause, say).
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.var_dir.parent / "launcher.log"

    @property
    def socket_path(self) -> Path:
        return self.var_dir / "run" / "redis.sock"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> LauncherProcess:
        env = worker_env("", self.appliance_root)
        env.pop("LMI_REDIS_URL")  # the launcher starts its own private Redis
        env.update(
            {
                "LMI_VAR_DIR": str(self.var_dir),
                "LMI_BIND": "127.0.0.1",
                "LMI_PORT": str(self.port),
                "LMI_SMTP_HOST": "127.0.0.1",
                "LMI_SMTP_PORT": str(self.smtp_port),
                "LMI_ADMIN_PASSWORD": "launcher-test-password",
                "LMI_WEB_WORKERS": "1",
                "LMI_WORKER_CONCURRENCY": "1",
            }
        )
        env.pop("LMI_NODE_NAME", None)
        env.pop("LMI_CLUSTER_ROLE", None)
        env.update(self.extra_env)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lmi.launcher", "run"], cwd=BASE_DIR, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for(
            lambda: self.running() and self.smtp_answers() and self.workers_ready() >= 1,
            timeout=START_TIMEOUT,
            message=f"the launcher did not start; its log:\n{self.tail()}",
        )
        return self

    def running(self) -> bool:
        """The launcher itself is alive (fails the test at once if it exited)."""
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the launcher exited with {self.process.returncode}:\n{self.tail()}")
        return True

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def children(self) -> dict[str, int]:
        """The launcher's live children by name (redis, web, worker, beat, smtp) -> pid."""
        assert self.process is not None
        found: dict[str, int] = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                name = _child_name(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if name:
                found[name] = child.pid
        return found

    def smtp_answers(self) -> bool:
        try:
            return read_banner("127.0.0.1", self.smtp_port)[:3] == b"220"
        except OSError:
            return False

    def redis(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=2)

    def redis_answers(self) -> bool:
        try:
            return bool(self.redis().ping())
        except (redis.RedisError, OSError):
            return False

    def workers_ready(self) -> int:
        """How many times a worker of this launcher logged that it consumes."""
        return self.log().count(f"{WORKER_HOSTNAME} ready.")

    def send_task(
        self,
        name: str,
        *args: object,
        countdown: float | None = None,
        queue: str = "",
    ) -> str:
        """Publish a task on this launcher's Redis; returns its id, which the worker logs."""
        task_id = f"{name}-{uuid.uuid4().hex[:12]}"
        url = f"redis+socket://{self.socket_path}"
        with celery_app.connection_for_write(url=url) as connection:
            celery_app.send_task(
                name, args=args, task_id=task_id, countdown=countdown, connection=connection,
                **({"queue": queue} if queue else {}),
            )  # fmt: skip
        return task_id

    def task_succeeded(self, task_id: str) -> bool:
        return f"[{task_id}] succeeded" in self.log()

    def stop(self) -> int:
        """SIGTERM, as `kill` or a service manager stops it; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def processes(self) -> list[psutil.Process]:
        """The launcher and everything under it, as they are now."""
        assert self.process is not None
        try:
            top = psutil.Process(self.process.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def kill_leftovers(processes: list[psutil.Process]) -> None:
    """SIGKILL whichever of these still runs (psutil checks it is still the same process)."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.fixture
def launcher(
    transactional_db: None, appliance_root: Path, tmp_path: Path
) -> Iterator[LauncherProcess]:
    """`make run`'s launcher on free ports with its own var/ and Redis, on the test database."""
    with launched_console(tmp_path, appliance_root) as launched:
        yield launched


@contextlib.contextmanager
def launched_console(
    tmp_path: Path, appliance_root: Path, **extra_env: str
) -> Iterator[LauncherProcess]:
    """Start the launcher (after whatever the test prepared in the appliance root) and make
    sure none of its processes outlives the block."""
    launched = LauncherProcess(
        var_dir=tmp_path / "var", appliance_root=appliance_root, extra_env=extra_env
    )
    try:
        yield launched.start()
    finally:
        # Its children run in sessions of their own: none may outlive the test, stopped or not.
        processes = launched.processes() if launched.process is not None else []
        try:
            if launched.process is not None:
                launched.stop()
        finally:
            kill_leftovers(processes)
