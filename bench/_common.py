"""What several benches do alike: store mail the way the mail service does, and wait for its
delivery spool to empty.

Imported as ``from _common import ...`` (bench/ is sys.path[0]); the console's modules are
imported inside the functions, once the bench has put the project on the path and set up Django.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def quarantined_spam(number: int, raw: bytes, *, logged_at: int, sender: str, subject: str) -> Any:
    """A mailrecords.MailRecord of spam the mail service quarantined, message ``number`` of a run:
    one recipient, the raw copy kept in the Spam quarantine (the tests' own record of it, from
    tests/support/message_store.py)."""
    from tests.support.message_store import quarantined_spam as spam_record

    return spam_record(
        raw,
        logged_at=logged_at,
        sender=sender,
        subject=subject,
        message_id=f"<bench.{number}@example.net>",
        response="250 2.0.0 Ok: queued as BENCH",
    )


def spool_drain(spool: Path, timeout: float) -> None:
    """Wait until the background delivery has moved every spooled message to the sink."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(path.suffix == ".eml" for path in spool.iterdir()):
            return
        time.sleep(0.1)
    raise SystemExit("the mail spool did not drain")
