"""Cluster nodes for integration tests: each its own appliance root, database, var/ and worker
(with its beat inside, -B), all on the session's one Redis, started through the same LMI_*
variables production uses.

Central is the test process's own database (so the test reads Central's rows directly); a
member gets a copy of a database migrated once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lmi.celery import node_queue
from tests.support.services import (
    BASE_DIR,
    WorkerProcess,
    launch_worker,
    worker_env,
)
from tests.support.smtp import free_port, read_banner


def migrated_database(directory: Path) -> Path:
    """A freshly migrated SQLite database file (run once per session, then copied)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "template.sqlite3"
    env = {**os.environ, "LMI_DATABASE_URL": f"sqlite:///{path}", "LMI_VAR_DIR": str(directory)}
    subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), "migrate", "--noinput", "-v", "0"],
        cwd=BASE_DIR, env=env, check=True,
    )  # fmt: skip
    return path


@dataclass
class Node:
    """One cluster node on this machine."""

    name: str
    role: str
    root: Path
    var_dir: Path
    database_url: str
    redis_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    queues: tuple[str, ...] = ()
    smtp_port: int = field(default_factory=free_port)
    worker: WorkerProcess | None = None
    smtp: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = worker_env(self.redis_url, self.root)
        env.update(
            {
                "LMI_DATABASE_URL": self.database_url,
                "LMI_VAR_DIR": str(self.var_dir),
                "LMI_NODE_NAME": self.name,
                "LMI_CLUSTER_ROLE": self.role,
                "LMI_CLUSTER_CENTRAL": "central",
                "LMI_CLUSTER_REPORT_SECONDS": "1",
                "LMI_SMTP_PORT": str(self.smtp_port),
            }
        )
        env.update(self.extra_env)
        return env

    def start_worker(self) -> WorkerProcess:
        """`celery worker -B` consuming this node's queue; returns once it consumes."""
        hostname = f"{self.name}-{uuid.uuid4().hex[:6]}@{self.name}"
        self.var_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.var_dir / f"worker-{hostname.split('@')[0]}.log"
        queues = ",".join(self.queues or (node_queue(self.name),))
        self.worker = launch_worker(
            hostname, self.env(), log_path, "-B",
            "--schedule", str(self.var_dir / "celerybeat-schedule"),
            "--concurrency", "2", "--queues", queues,
        )  # fmt: skip
        return self.worker

    def start_smtp(self) -> None:
        """This node's mail processing service, as `make run` starts it."""
        command = [sys.executable, str(BASE_DIR / "manage.py"), "smtp_service",
                   "--host", "127.0.0.1", "--port", str(self.smtp_port)]  # fmt: skip
        self.var_dir.mkdir(parents=True, exist_ok=True)
        with (self.var_dir / f"smtp-{self.smtp_port}.log").open("ab") as log:
            self.smtp = subprocess.Popen(
                command, cwd=BASE_DIR, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if read_banner("127.0.0.1", self.smtp_port)[:3] in (b"220", b"421"):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name}'s smtp_service did not answer")

    def manage(self, *args: str) -> str:
        """Run a management command on this node (its database, root and settings)."""
        done = subprocess.run(
            [sys.executable, str(BASE_DIR / "manage.py"), *args],
            cwd=BASE_DIR, env=self.env(), check=True, capture_output=True, text=True,
        )  # fmt: skip
        return done.stdout

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.smtp is not None and self.smtp.poll() is None:
            os.killpg(self.smtp.pid, 15)
            self.smtp.wait(timeout=15)


def new_member(name: str, tmp_path: Path, template: Path, redis_url: str, **extra_env: str) -> Node:
    """A member node: its own demo appliance root, var/ and a copy of the migrated database."""
    from appliance.demo import init_demo

    base = tmp_path / name
    root = base / "appliance"
    root.mkdir(parents=True)
    init_demo(root, messages=40, graph_days=1)
    var_dir = base / "var"
    var_dir.mkdir()
    database = base / "lmi.sqlite3"
    shutil.copyfile(template, database)
    return Node(
        name=name, role="member", root=root, var_dir=var_dir,
        database_url=f"sqlite:///{database}", redis_url=redis_url, extra_env=dict(extra_env),
    )  # fmt: skip
