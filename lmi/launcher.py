"""`make run`: set the console up and serve it with its workers; Ctrl-C stops everything.

    python -m lmi.launcher setup   # migrate, first administrator, demo appliance, static files
    python -m lmi.launcher run     # setup, then Redis (if needed), gunicorn, worker, beat and
                                   # the mail processing service (SMTP)

Everything here is process plumbing; what the steps do lives in management commands.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _manage(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, str(BASE_DIR / "manage.py"), *args], check=True, env=env)


def setup(env: dict[str, str]) -> None:
    """Idempotent: a second run changes nothing that is already in place."""
    _manage("migrate", "--noinput", "-v", "0", env=env)
    _manage("ensure_admin", env=env)
    _manage("init_appliance", env=env)
    _manage("collectstatic", "--noinput", "-v", "0", env=env)


def _var_dir(env: dict[str, str]) -> Path:
    raw = env.get("LMI_VAR_DIR", "")
    return Path(raw).resolve() if raw else BASE_DIR / "var"


def _worker_queue(env: dict[str, str]) -> str:
    """The queue this node's worker consumes (the same rule as lmi/settings.py)."""
    role = (env.get("LMI_CLUSTER_ROLE") or "standalone").strip().lower()
    if role in ("central", "member"):
        return f"lmi.node.{env.get('LMI_NODE_NAME') or 'central'}"
    return env.get("LMI_CELERY_QUEUE") or "lmi"


def run() -> int:
    env = _env()
    setup(env)
    from lmi.redisserver import PrivateRedis, start_private_redis

    private: PrivateRedis | None = None
    if not env.get("LMI_REDIS_URL"):
        private = start_private_redis(_var_dir(env) / "run")
        env["LMI_REDIS_URL"] = private.url
        print(f"Started a private Redis on {private.socket_path}")
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
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False
    crashed = ""

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for name, command in commands.items():
            # Own process groups: Ctrl-C reaches us only, and we stop the children in order.
            children[name] = subprocess.Popen(
                command, cwd=BASE_DIR, env=env, start_new_session=True
            )
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
            for name, child in children.items():
                if child.poll() is not None:
                    print(f"{name} exited with {child.returncode}; stopping the console.")
                    stopping = True
                    crashed = name
                    break
            time.sleep(0.5)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 15
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if private is not None:
            private.stop()
        print("LMI stopped.")
    return 1 if crashed else 0


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
