"""Response shapes of the API (they are also its OpenAPI description).

A shape's class name is its name among the description's components, which all routers share:
ninja keeps the last of two classes with one name, so each name here must be unique in the API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ninja import Schema


class Problem(Schema):
    """Every error: a sentence saying what went wrong and what to do."""

    detail: str


class InterfaceOut(Schema):
    name: str
    mode: str
    address: str | None
    prefix: int | None
    gateway: str | None


# Not ``SystemOut``: that name is the system backups' shape (backups.api).
class SystemInfoOut(Schema):
    firmware_version: str
    os_release: str
    hostname: str
    model: str
    serial: str
    build: str
    uptime_seconds: int
    interfaces: list[InterfaceOut]


class DiskOut(Schema):
    role: str
    path: str
    mountpoint: str
    total: int
    used: int
    free: int
    free_percent: float
    meets_upgrade_requirement: bool


class ResourcesOut(Schema):
    required_free_percent: float
    disks: list[DiskOut]
    memory_total: int
    memory_used: int
    memory_percent: float
    cpu_count: int
    cpu_percent: float
    load: list[float]


class EventOut(Schema):
    id: int
    created_at: datetime
    severity: str
    category: str
    node: str
    username: str
    message: str
    details: dict[str, Any]


class EventPageOut(Schema):
    events: list[EventOut]
    older: str | None = None
    newer: str | None = None


class MeOut(Schema):
    username: str
    role: str
