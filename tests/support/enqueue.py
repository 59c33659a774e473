"""What services hand to the worker, seen without a broker: every service enqueues through
lmi.celery.enqueue by task name, so replacing that one function shows (or refuses) them all."""

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


def broker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every enqueue fails as it does while Redis is down."""

    def enqueue(name: str, *args: Any, countdown: float | None = None) -> None:
        raise ConnectionRefusedError("redis is down")

    monkeypatch.setattr(lmi_celery, "enqueue", enqueue)
