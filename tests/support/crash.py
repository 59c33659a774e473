"""The process dying in the middle of a multi-step write, for the tests of recovery."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Crash(BaseException):
    """Stands for the process dying: a BaseException, so nothing in the code under test
    catches it."""


@contextmanager
def crash_on_call(owner: object, name: str, number: int) -> Iterator[None]:
    """``owner.name`` works as before but raises Crash on its ``number``-th call (the calls before
    have done their work); the real one is back when the block is left."""
    real = getattr(owner, name)
    calls = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == number:
            raise Crash
        return real(*args, **kwargs)

    setattr(owner, name, counting)
    try:
        yield
    finally:
        setattr(owner, name, real)
