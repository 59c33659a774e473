"""The validation report of an install, kept beside its log in var/spool/updates/XPU.

Phase 10 removes the install's work folder, so the report is written where the run's log
lives: it survives the install, is listed with the update logs, and is what the console's
download serves. One JSON document per run, replaced atomically when phase 10 runs again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.system.atomic import atomic_write_text
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout


def report_name(run_id: int) -> str:
    return f"install-{int(run_id)}-validation.json"


def report_path(run_id: int, root: Path | None = None) -> Path:
    return layout(root).xpu_dir / report_name(run_id)


def report_write(run_id: int, report: dict[str, Any], root: Path | None = None) -> Path:
    """Write (or replace) the run's report, durably; returns its path."""
    path = report_path(run_id, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path


def report_read(run_id: int, root: Path | None = None) -> dict[str, Any] | None:
    """The run's report, or None when none was written."""
    path = report_path(run_id, root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MalformedApplianceFile(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedApplianceFile(f"{path} is not a validation report")
    return data
