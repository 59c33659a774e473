"""The broker or the worker dies in the middle of an install, under live mail: nothing is lost.

`make run`'s launcher (its own private Redis, worker, beat and mail service, on the test
database and root) runs a real install while a client sends mail all along. Inside phase 7,
with mail held (421), the test SIGKILLs the launcher's Redis, or its worker. Asserted: the
launcher brings it back, the install goes on (the same worker after a Redis blip; the new one,
sent by the reconciler at its start, after a worker kill), the run ends succeeded within a
minute of the fault, every message the service answered 250 to is in the SMTP log exactly
once, and mail was refused only while the install held it.
"""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from appliance.mail import msgcounts
from tests.support import enqueue as enqueues
from tests.support.launcher import launched_console
from tests.support.services import wait_for
from tests.support.smtp import CLIENT_NAME
from tests.upgrades.test_install import (  # noqa: F401
    NEW_VERSION,
    ready_firmware,
    roomy_preflight_disk,
    wait_final,
    wait_for_checkpoint,
)
from upgrades import install
from upgrades.models import Download, InstallState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_S = 60


class MailLoad(threading.Thread):
    """One message after another to the service; counts 250s and 4xx refusals (with when)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.accepted = 0
        self.refused: list[float] = []
        self.failed: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            n += 1
            try:
                self._send(n)
                self.accepted += 1
            except smtplib.SMTPResponseException as exc:
                if 400 <= exc.smtp_code < 500:
                    self.refused.append(time.monotonic())
                else:
                    self.failed.append(f"{exc.smtp_code}: {exc}")
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [code for code, _ in exc.recipients.values()]
                if all(400 <= code < 500 for code in codes):
                    self.refused.append(time.monotonic())
                else:
                    self.failed.append(f"recipients refused: {exc.recipients}")
            except (OSError, smtplib.SMTPException) as exc:  # the service must never be down
                self.failed.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)

    def _send(self, n: int) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_NAME, timeout=10) as c:
            c.sendmail(
                "load@client.test",
                ["user@example.com"],
                f"From: <load@client.test>\r\nSubject: load {n}\r\n\r\nmessage {n}\r\n",
            )


@pytest.mark.parametrize("victim", ["redis", "worker"])
def test_a_broker_or_worker_killed_inside_an_install_costs_no_mail(
    victim: str,
    ready_firmware: Download,  # noqa: F811
    tmp_path: Path,
    appliance_root: Path,
    monkeypatch,
) -> None:
    sent = enqueues.capture(monkeypatch, "jobs.run")  # the job goes to the launcher's Redis
    with launched_console(
        tmp_path,
        appliance_root,
        LMI_INSTALL_PHASE_DELAY_MS="1500",
        LMI_INSTALL_PHASE_DELAY_PHASE="7",
    ) as console:
        before = msgcounts.store_counts()
        load = MailLoad(console.smtp_port)
        load.start()
        wait_for(lambda: load.accepted >= 5 or load.failed, message="no mail was answered")
        assert load.accepted >= 5, load.failed

        started_at = time.monotonic()
        run = install.install_start(user="admin")
        assert sent == [run.job_id]
        console.send_task("jobs.run", run.job_id)
        wait_for_checkpoint(run, 7, timeout=90, interval=0.05)
        killed = console.children()[victim]
        os.killpg(os.getpgid(killed), signal.SIGKILL)  # a worker with its pool, as a crash
        fault_at = time.monotonic()
        wait_for(
            lambda: (
                console.children().get(victim) not in (None, killed) and console.redis_answers()
            ),
            timeout=30,
            message=f"the {victim} was not restarted:\n{console.tail()}",
        )

        run = wait_final(run.pk, timeout=RECOVERY_S)
        ended_at = time.monotonic()
        time.sleep(0.5)  # some mail after the install too
        load.done.set()
        load.join(timeout=15)

        assert run.state == InstallState.SUCCEEDED, (run.state, run.error)
        # A Redis blip leaves the worker at its job; a dead worker's job is resumed once.
        assert run.job.restarts == (1 if victim == "worker" else 0)
        assert ended_at - fault_at < RECOVERY_S
        assert load.failed == [], load.failed  # never a refused connection or a 5xx
        assert "Unrecoverable error" not in console.log()
        after = msgcounts.store_counts()
        # Every 250 is in the log once, and so is the install's one health probe.
        assert after.smtp_log == before.smtp_log + load.accepted + 1
        assert after.messages == before.messages == run.messages_after
        # Mail was refused only inside the install's downtime window.
        assert run.downtime_seconds is not None
        assert load.refused, "the install never held mail: the checkpoint was missed"
        assert all(started_at <= moment <= ended_at for moment in load.refused)
