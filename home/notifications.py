"""The home page's notification area. Each source returns the notices that hold right now.

``Notice`` is re-exported from lmi.notices for the callers that import it from here.

Later features (firmware available, ready to install, upgrade running) add a source to
NOTICE_SOURCES; the home page and its partial render whatever the sources return.
"""

from __future__ import annotations

from collections.abc import Callable

from django.template.defaultfilters import filesizeformat
from django.urls import reverse

from appliance.system.errors import ApplianceError, ApplianceNotInitialized
from appliance.system.facts import system_info
from home.selectors import DiskUsage, upgrade_disks
from lmi.notices import Notice
from upgrades.notifications import update_notices


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
    except ApplianceError as exc:
        return [Notice("error", f"The appliance's files cannot be read: {exc}")]
    return []


def _disk_notices() -> list[Notice]:
    """One warning per disk below the upgrade's free-space rule (both roles may share a disk),
    with the rule in force and how much has to go."""
    failing: dict[str, list[DiskUsage]] = {}
    for disk in upgrade_disks():
        if not disk.meets_upgrade_requirement:
            failing.setdefault(disk.mountpoint, []).append(disk)
    notices = []
    for mountpoint, disks in failing.items():
        holds = " and the ".join(disk.role.lower() for disk in disks)
        disk = disks[0]
        notices.append(
            Notice(
                "warning",
                f"The disk of the {holds} ({mountpoint}) has {disk.free_percent:.1f}% free; a "
                f"firmware upgrade needs {disk.required_percent:.0f}%: "
                f"{filesizeformat(disk.needed)} more has to be freed.",
                "Reclaim disk space",
                reverse("home:resources"),
            )
        )
    return notices


NOTICE_SOURCES: list[Callable[[], list[Notice]]] = [
    _appliance_notices,
    _disk_notices,
    update_notices,
]


def current_notices() -> list[Notice]:
    """All notices, in source order."""
    notices: list[Notice] = []
    for source in NOTICE_SOURCES:
        notices.extend(source())
    return notices
