"""What services hand to the worker, seen without a broker: every service enqueues through
lmi.celery.enqueue by task name, so replacing that one function shows (or refuses) them all.

The ``enqueued`` fixture is registered for the whole suite (tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from lmi import celery as lmi_celery


def capture(monkeypatch: pytest.MonkeyPatch, task: str) -> list[Any]:
    """The first argument of each ``task`` enqueued from now on (other tasks are dropped)."""
    sent: list[Any] = []

    def enqueue(name: str, *args: Any, countdown: float | None = None) -> None:
        if name == task:
            sent.append(args[0] if len(args) == 1 else args)

    monkeypatch.setattr(lmi_celery, "enqueue", enqueue)
    return sent


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The job ids handed to the job engine ("jobs.run") from the fixture's setup on, held in
    a list instead of a broker: the test counts them, runs them itself, or hands each to a
    launched console's Redis (LauncherProcess.send_task) when its fault wants it there."""
    return capture(monkeypatch, "jobs.run")


def broker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every enqueue fails as it does while Redis is down."""

    def enqueue(name: str, *args: Any, countdown: float | None = None) -> None:
        raise ConnectionRefusedError("redis is down")

    monkeypatch.setattr(lmi_celery, "enqueue", enqueue)
