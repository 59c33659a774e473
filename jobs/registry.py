"""The kinds of job, each registered by its app (AppConfig.ready) with its recovery rule.

The reconciler reads ``on_dead`` to decide, from this one table, what a job whose worker died
becomes: run again from where its own stored state says it is (``resume``), run again from the
start (``restart``, for work that writes through a temporary file or a journal), undone
(``rollback``), or failed (``fail``, for work that must not be repeated blindly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

OnDead = Literal["resume", "restart", "rollback", "fail"]


@dataclass(frozen=True)
class Kind:
    """What a kind of job does, and what becomes of it when its worker dies."""

    name: str
    label: str
    category: str  # events.models.Category of its events
    # Called with the worker's jobs.engine.Lease (typed loosely: the engine builds on this
    # module, so this module does not import it back). None for a driven kind.
    run: Callable[[Any], None] | None = None
    on_dead: OnDead = "fail"
    max_restarts: int = 2
    cancellable: bool = False
    rollback: Callable[[Any], None] | None = None
    lease_seconds: float = 30.0
    # The service writes the start and the outcome events itself (with its own figures); the
    # engine then writes only what the service cannot: a finish with a message, a recovery.
    own_events: bool = False
    # Where the worker runs it: its own queue lets a long job not hold up short ones.
    task_name: str = "jobs.run"
    # Advanced by its service from the facts as they arrive (a cluster upgrade follows its
    # members' reports) instead of held by a worker: created running without a lease, moved
    # on and finished with jobs.engine.drive, and left alone by the reconciler (no holder can
    # die; its service's own timeout ends it).
    driven: bool = False


_KINDS: dict[str, Kind] = {}
# Work that keeps its own records (a download, an install run's phases) gives the reconciler a
# function that hands whatever lost its worker or its message to the worker again and returns
# the ids it handed; the reconciler calls each on every pass.
_RECOVERIES: dict[str, Callable[[], list[int]]] = {}


def register(kind: Kind) -> Kind:
    """Add (or, on a reload, replace) a kind."""
    if kind.on_dead == "rollback" and kind.rollback is None:
        raise ValueError(f"job kind {kind.name} rolls back but has no rollback")
    if (kind.run is None) != kind.driven:
        raise ValueError(f"job kind {kind.name} needs a run, or is driven (and has none)")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The kind registered under ``name``; KeyError for an unknown one."""
    return _KINDS[name]


def kinds() -> list[Kind]:
    return list(_KINDS.values())


def register_recovery(name: str, recover: Callable[[], list[int]]) -> None:
    """Add (or replace) a recovery the reconciler runs on every pass."""
    _RECOVERIES[name] = recover


def recoveries() -> dict[str, Callable[[], list[int]]]:
    return dict(_RECOVERIES)
