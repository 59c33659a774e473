"""The real mail processing service as a subprocess, for integration tests.

`python manage.py smtp_service` is started exactly as `make run` starts it, pointed at the test's
appliance root and the test database through the same LMI_* variables, on a free loopback
port. Tests talk to it with the standard library's smtplib, stop it with SIGTERM or kill it
with SIGKILL, and start it again on the same port.

Import the fixture into a test module (``from tests.support.smtp import smtp_service  # noqa:
F401``) or a conftest.py.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from tests.support.services import test_database_url

BASE_DIR = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
# smtplib would otherwise name itself with socket.getfqdn(), a DNS lookup.
CLIENT_NAME = "client.test"
# A sender on the demo appliance's "Allowed domains" list and one of its own mailboxes: the pair
# the service accepts mail between without any further setup.
PARTNER = "anna.schmidt@partner.example.net"
STAFF = "bob.meyer@example.com"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_banner(host: str, port: int, timeout: float = 2.0) -> bytes:
    """Connect and return the first reply line (the 220 greeting, or 421 in maintenance)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return sock.makefile("rb").readline()


@dataclass
class SmtpServiceProcess:
    """A running `manage.py smtp_service` and how to talk to it, stop, kill or restart it."""

    appliance_root: Path
    log_dir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"smtp-service-{self.port}-{self.starts}.log"

    def log(self) -> str:
        """Everything every start of the service wrote, oldest first."""
        paths = sorted(self.log_dir.glob(f"smtp-service-{self.port}-*.log"))
        return "\n".join(path.read_text(errors="replace") for path in paths)

    def start(self) -> SmtpServiceProcess:
        """Start the service and wait until it answers on its port."""
        self.starts += 1
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "lmi.settings",
                "LMI_DATABASE_URL": test_database_url(),
                "LMI_APPLIANCE_ROOT": str(self.appliance_root),
                "PYTHONUNBUFFERED": "1",
            }
        )
        command = [
            sys.executable, str(BASE_DIR / "manage.py"), "smtp_service",
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"smtp_service exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if read_banner(self.host, self.port)[:3] in (b"220", b"421"):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"smtp_service did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def client(self, timeout: float = 10.0) -> smtplib.SMTP:
        """A connected smtplib client (greeted; EHLO is sent by smtplib when needed)."""
        return smtplib.SMTP(self.host, self.port, local_hostname=CLIENT_NAME, timeout=timeout)

    def accepts_connections(self) -> bool:
        """Whether a new TCP connection to the service's port is taken (not refused)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def terminate(self) -> None:
        """SIGTERM: a graceful stop. Does not wait."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut of the process would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def smtp_service(
    transactional_db: None, demo_appliance: Path, tmp_path: Path
) -> Iterator[SmtpServiceProcess]:
    """The real service on a free loopback port, serving the test's demo appliance."""
    service = SmtpServiceProcess(appliance_root=demo_appliance, log_dir=tmp_path).start()
    yield service
    service.stop()


@dataclass
class ReceivedMessage:
    """One message the next hop accepted: its envelope and content."""

    sender: str
    recipients: list[str]
    content: bytes


class NextHop:
    """A loopback SMTP server standing in for the groupware server behind the appliance."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[ReceivedMessage] = []
        self._controller: Controller | None = None

    @property
    def address(self) -> str:
        """As the SMTP settings' next_hop names it."""
        return f"127.0.0.1:{self.port}"

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.messages.append(
            ReceivedMessage(
                envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""
            )
        )
        return "250 2.0.0 Ok: delivered"

    def start(self) -> NextHop:
        self._controller = Controller(
            self, hostname="127.0.0.1", port=self.port, server_hostname="nexthop.test"
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def next_hop() -> Iterator[NextHop]:
    """A running loopback next hop; point SmtpSettings.next_hop at ``next_hop.address``."""
    hop = NextHop().start()
    yield hop
    hop.stop()
