"""Live mail for the fault tests: one message after another, every answer counted with its time.

A 250 is counted in ``accepted`` (the test then finds each in the SMTP log exactly once); a 4xx
(421 while an install holds mail) in ``refused``; a refused or cut connection in ``down``
(allowed only where a test killed the mail service itself; a cut session is also counted in
``cut``, since its message may have been stored without its 250 reaching the client); anything
else (a 5xx, a timeout) in ``failed``, which a fault test expects empty.
"""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from collections.abc import Iterator

from tests.support.services import wait_for
from tests.support.smtp import CLIENT_NAME


class SmtpSessions(threading.Thread):
    """One SMTP session after another with the mail service on 127.0.0.1:``port``, in the
    background, ``pause`` seconds apart, until ``stop()``; a subclass says what one session does
    and how it counts the answer."""

    pause = 0.05
    session_timeout = 10.0
    stop_timeout = 15.0

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.session()
            self.done.wait(self.pause)

    def session(self) -> None:
        raise NotImplementedError

    def connect(self) -> smtplib.SMTP:
        return smtplib.SMTP(
            "127.0.0.1", self.port, local_hostname=CLIENT_NAME, timeout=self.session_timeout
        )

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=self.stop_timeout)


class MailLoad(SmtpSessions):
    """Sends to user@example.com until stopped, counting every answer."""

    pause = 0.02

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sent = 0
        self.accepted = 0
        self.refused: list[float] = []
        self.down: list[float] = []
        self.cut = 0  # sessions the dying service cut short (each in ``down`` too)
        self.failed: list[str] = []

    def session(self) -> None:
        self.sent += 1
        try:
            self._send(self.sent)
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
        except ConnectionRefusedError:
            self.down.append(time.monotonic())
        except (ConnectionResetError, smtplib.SMTPServerDisconnected):
            # The service died under this session: the message may or may not be stored.
            self.down.append(time.monotonic())
            self.cut += 1
        except (OSError, smtplib.SMTPException) as exc:
            self.failed.append(f"{type(exc).__name__}: {exc}")

    def _send(self, n: int) -> None:
        with self.connect() as client:
            client.sendmail(
                "load@client.test",
                ["user@example.com"],
                f"From: <load@client.test>\r\nSubject: load {n}\r\n\r\nmessage {n}\r\n",
            )


@contextlib.contextmanager
def mail_flowing(port: int) -> Iterator[MailLoad]:
    """A MailLoad on the mail service at ``port`` for the length of the block, entered once the
    first answers are in (so a fault meets mail already flowing), stopped however it ends."""
    load = MailLoad(port)
    load.start()
    try:
        wait_for(lambda: load.accepted >= 5 or load.failed, message="no mail was answered")
        yield load
    finally:
        load.stop()


def outside(moments: list[float], *windows: tuple[float, float]) -> list[float]:
    """The moments that fall in none of the windows (expected: none)."""
    return [m for m in moments if not any(start <= m <= end for start, end in windows)]
