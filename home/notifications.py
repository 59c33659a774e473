"""The home page's notification area. Each source returns the notices that hold right now.

Later features (firmware available, ready to install, upgrade running) add a source to
NOTICE_SOURCES; the home page and its partial render whatever the sources return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import ApplianceNotInitialized
from appliance.system import system_info


@dataclass(frozen=True)
class Notice:
    """One notification: level is info, warning or error."""

    level: str
    message: str
    link_label: str = ""
    link_url: str = ""


def _appliance_notices() -> list[Notice]:
    try:
        system_info()
    except ApplianceNotInitialized:
        return [
            Notice(
                "error",
                "The appliance root holds no appliance yet: run `python manage.py "
                "init_appliance` (make run does this for you).",
            )
        ]
    return []


def _disk_notices() -> list[Notice]:
    from django.urls import reverse

    from home.selectors import UPGRADE_FREE_PERCENT, upgrade_disks

    notices = []
    for disk in upgrade_disks():
        if not disk.meets_upgrade_requirement:
            notices.append(
                Notice(
                    "warning",
                    f"The {disk.role.lower()} disk ({disk.mountpoint}) has "
                    f"{disk.free_percent:.0f}% free; a firmware upgrade needs "
                    f"{UPGRADE_FREE_PERCENT:.0f}%.",
                    "Reclaim disk space",
                    reverse("home:resources"),
                )
            )
    return notices


NOTICE_SOURCES: list[Callable[[], list[Notice]]] = [_appliance_notices, _disk_notices]


def current_notices() -> list[Notice]:
    """All notices, in source order."""
    notices: list[Notice] = []
    for source in NOTICE_SOURCES:
        notices.extend(source())
    return notices
