"""Live mail for the fault tests: one message after another, every answer counted with its time.

A 250 is counted in ``accepted`` (the test then finds each in the SMTP log exactly once); a 4xx
(421 while an install holds mail) in ``refused``; a refused or cut connection in ``down``
(allowed only where a test killed the mail service itself; a cut session is also counted in
``cut``, since its message may have been stored without its 250 reaching the client); anything
else (a 5xx, a timeout) in ``failed``, which a fault test expects empty.
"""

from __future__ import annotations

import smtplib
import threading
import time

from tests.support.smtp import CLIENT_NAME


class MailLoad(threading.Thread):
    """Sends to user@example.com on 127.0.0.1:``port`` until ``done`` is set."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.accepted = 0
        self.refused: list[float] = []
        self.down: list[float] = []
        self.cut = 0  # sessions the dying service cut short (each in ``down`` too)
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
            except ConnectionRefusedError:
                self.down.append(time.monotonic())
            except (ConnectionResetError, smtplib.SMTPServerDisconnected):
                # The service died under this session: the message may or may not be stored.
                self.down.append(time.monotonic())
                self.cut += 1
            except (OSError, smtplib.SMTPException) as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)

    def _send(self, n: int) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_NAME, timeout=10) as c:
            c.sendmail(
                "load@client.test",
                ["user@example.com"],
                f"From: <load@client.test>\r\nSubject: load {n}\r\n\r\nmessage {n}\r\n",
            )

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=15)


def outside(moments: list[float], *windows: tuple[float, float]) -> list[float]:
    """The moments that fall in none of the windows (expected: none)."""
    return [m for m in moments if not any(start <= m <= end for start, end in windows)]
