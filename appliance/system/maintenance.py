"""Maintenance mode: while it is on, the mail service answers 421 so that senders retry later.

The upgrade's shutdown phases (3 to 9) put the appliance into maintenance mode; an
administrator can too. The state is a small file under the appliance root rather than a row in
the console's database because the mail service reads it on every connection and must keep
honouring it across a restart of any process, including a killed upgrade.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from appliance.system.atomic import atomic_write_text, fsync_dir
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout


@dataclass(frozen=True)
class MaintenanceState:
    """Why and since when the appliance is in maintenance mode, and who put it there."""

    reason: str
    since: datetime
    by: str
    # While set, the mail service accepts one kind of message despite maintenance: the upgrade's
    # health probe, whose envelope sender is ``upgrade-probe+<probe>@localhost``.
    probe: str = ""
    # The work that holds it ("install:<run id>"), so that the reconciler can leave a
    # maintenance nothing holds any more; empty for an administrator's own.
    holder: str = ""

    def as_json(self) -> str:
        data = asdict(self)
        data["since"] = self.since.isoformat()
        for optional in ("probe", "holder"):
            if not data[optional]:
                del data[optional]
        return json.dumps(data, sort_keys=True)

    def admits(self, sender: str | None) -> bool:
        """True when ``sender`` is the health probe's envelope sender for this maintenance."""
        if not self.probe or not sender:
            return False
        return secrets.compare_digest(
            sender.strip("<>").lower().encode(), probe_sender(self.probe).lower().encode()
        )


def probe_sender(token: str) -> str:
    """The envelope sender of the upgrade's health probe for ``token``."""
    return f"upgrade-probe+{token}@localhost"


def maintenance_status(root: Path | None = None) -> MaintenanceState | None:
    """The current maintenance state, or None when mail is being accepted normally."""
    path = layout(root).maintenance_file
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return MaintenanceState(
            reason=str(data["reason"]),
            since=datetime.fromisoformat(data["since"]),
            by=str(data.get("by", "")),
            probe=str(data.get("probe", "")),
            holder=str(data.get("holder", "")),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        # A damaged file still means "someone wanted maintenance": never silently accept mail.
        raise MalformedApplianceFile(f"{path} cannot be read: {exc}") from exc


def maintenance_enter(
    reason: str, by: str = "", root: Path | None = None, *, holder: str = ""
) -> MaintenanceState:
    """Turn maintenance mode on (or update its reason); durable before it returns."""
    state = MaintenanceState(reason=reason, since=datetime.now(tz=UTC), by=by, holder=holder)
    path = layout(root).maintenance_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, state.as_json() + "\n")
    return state


def maintenance_leave(root: Path | None = None) -> bool:
    """Turn maintenance mode off; True when it was on."""
    path = layout(root).maintenance_file
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def _drained_path(root: Path | None) -> Path:
    return layout(root).maintenance_file.with_name("maintenance-drained.json")


def maintenance_drained_mark(state: MaintenanceState, root: Path | None = None) -> None:
    """The mail service's word: no transaction begun before this maintenance is still open.

    Written once per maintenance (its ``since``) when the last transaction in flight ends, or
    at once when there was none; what the upgrade's shutdown waits for instead of a fixed time.
    """
    path = _drained_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"since": state.since.isoformat()}) + "\n")


def maintenance_drained(state: MaintenanceState, root: Path | None = None) -> bool:
    """Whether the mail service said this maintenance found it without a transaction open."""
    try:
        data = json.loads(_drained_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("since") == state.since.isoformat()


def maintenance_probe_open(root: Path | None = None) -> str:
    """Let the upgrade's health probe through maintenance; returns the probe's token.

    Maintenance must already be on (the probe checks a service that otherwise answers 421); the
    token is random per call so that nobody can guess a sender that passes maintenance.
    """
    state = maintenance_status(root)
    if state is None:
        raise MalformedApplianceFile("maintenance mode is off: there is nothing to probe through")
    token = secrets.token_hex(12)
    opened = replace(state, probe=token)
    atomic_write_text(layout(root).maintenance_file, opened.as_json() + "\n")
    return token


def maintenance_probe_close(root: Path | None = None) -> None:
    """Stop letting the health probe through (maintenance stays on, if it is on)."""
    state = maintenance_status(root)
    if state is None or not state.probe:
        return
    closed = replace(state, probe="")
    atomic_write_text(layout(root).maintenance_file, closed.as_json() + "\n")
