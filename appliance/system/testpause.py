"""The kill tests' checkpoints: settings.JOB_PAUSE, empty in production.

``"kind:step:ms"`` (or several, separated by commas) makes a job of that kind sleep when it
reaches that step, so a test's SIGKILL lands inside it. One parser for every caller: the job
engine's steps, the install's rollback steps and the image writer's named points. It lives at
the bottom layer because the image writer (appliance) must not import the job engine.
"""

from __future__ import annotations

import time

from django.conf import settings


def pause_for_tests(kind: str, step: int | str) -> None:
    """Sleep if JOB_PAUSE names this kind and step; return at once otherwise."""
    configured = getattr(settings, "JOB_PAUSE", "") if settings.configured else ""
    for entry in filter(None, (part.strip() for part in configured.split(","))):
        want_kind, _, rest = entry.partition(":")
        want_step, _, milliseconds = rest.rpartition(":")
        if want_kind == kind and want_step == str(step):
            time.sleep(int(milliseconds) / 1000)
            return
