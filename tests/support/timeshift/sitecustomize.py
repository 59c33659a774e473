"""Moves this Python process's clock by LMI_TEST_CLOCK_OFFSET seconds (scripts/test-on-date).

scripts/test-on-date puts this folder on PYTHONPATH, so every Python process of the suite (pytest,
its xdist workers, Celery workers, the SMTP service, update-control) imports it at start-up and
travels by the same offset with time-machine: they all agree on the moved time, which keeps
ticking; ``time.monotonic()`` is left alone, so timeouts and waits stay real. Nothing imports
this module otherwise.
"""

from __future__ import annotations

import os
import time

_offset = os.environ.get("LMI_TEST_CLOCK_OFFSET")
if _offset:
    import time_machine

    time_machine.travel(time.time() + float(_offset), tick=True).start()
