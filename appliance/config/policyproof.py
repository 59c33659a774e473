"""Proof that an upgrade kept every policy object, and the files its ``$(FILE/...)`` objects read.

Taken when mail stops (phase 3, configuration read-only from then on) and again after the
commit, from whichever configuration format is on disk (:mod:`appliance.config.store`). A
``$(FILE)`` list counts as present only when it can be read the way the mail-security engine
reads it (:func:`appliance.config.policy.read_object_lines`), and as unchanged only when its
bytes have the SHA-256 they had before; phase 8 carries the files over at the same paths.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.config.policy import PolicyObject, object_file, read_object_lines
from appliance.config.store import list_policy_objects
from appliance.system.errors import ApplianceError


@dataclass(frozen=True)
class ObjectFacts:
    """One policy object as the proof records it (JSON-safe)."""

    id: str
    name: str
    type: str
    value_sha256: str  # of the value (the macro itself for a $(FILE) object)
    file_path: str | None = None
    file_sha256: str | None = None  # None when the file is missing or unreadable
    file_entries: int | None = None
    file_error: str = ""


@dataclass(frozen=True)
class ObjectDifference:
    """One object that is not as it was: why, in words."""

    id: str
    name: str
    problem: str


def _facts(obj: PolicyObject, root: Path | None) -> ObjectFacts:
    value_sha = hashlib.sha256(obj.value.encode("utf-8")).hexdigest()
    if obj.file_path is None:
        return ObjectFacts(obj.id, obj.name, obj.type, value_sha)
    try:
        data = object_file(obj, root).read_bytes()
        entries = len(read_object_lines(obj, root))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return ObjectFacts(
            obj.id, obj.name, obj.type, value_sha, obj.file_path, file_error=str(exc)
        )
    return ObjectFacts(
        obj.id,
        obj.name,
        obj.type,
        value_sha,
        obj.file_path,
        hashlib.sha256(data).hexdigest(),
        entries,
    )


def policy_facts(root: Path | None = None) -> list[dict[str, Any]]:
    """Every policy object, in file order, with its $(FILE) list read and digested."""
    return [asdict(_facts(obj, root)) for obj in list_policy_objects(root)]


def policy_facts_or_error(root: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """:func:`policy_facts`, or no objects and why the configuration could not be read."""
    try:
        return policy_facts(root), ""
    except ApplianceError as exc:
        return [], str(exc)


def policy_differences(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> list[ObjectDifference]:
    """What is missing or changed after, object by object (objects added after are no loss)."""
    now = {str(item["id"]): item for item in after}
    found: list[ObjectDifference] = []
    for old in before:
        obj_id, name = str(old["id"]), str(old["name"])
        new = now.get(obj_id)
        if new is None:
            found.append(ObjectDifference(obj_id, name, "missing after the upgrade"))
            continue
        if (new["name"], new["type"]) != (old["name"], old["type"]):
            found.append(
                ObjectDifference(
                    obj_id,
                    name,
                    f"was {old['type']} {old['name']!r}, now {new['type']} {new['name']!r}",
                )
            )
        if new["value_sha256"] != old["value_sha256"]:
            found.append(ObjectDifference(obj_id, name, "its value changed"))
        if old.get("file_path") and old.get("file_sha256"):
            # A list already missing before is an old broken reference, not a loss.
            if new.get("file_sha256") is None:
                why = new.get("file_error") or "not readable"
                found.append(
                    ObjectDifference(obj_id, name, f"its file {old['file_path']} is gone: {why}")
                )
            elif new["file_sha256"] != old["file_sha256"]:
                found.append(ObjectDifference(obj_id, name, f"its file {old['file_path']} changed"))
    return found
