"""Mail Security policy objects (``etc/mailsec/cpe/mailsec_policyobjects1_1.xml``).

Each object's value is stored base64-encoded, with ``<name>`` on the line just above
``<value>``. That layout is load-bearing: the upgrade guide finds the objects whose value is a
``$(FILE/...)`` macro with ``grep -B 1 "JChGSUxFL"`` (the base64 of ``$(FILE/``), and prints
the name line above each hit. The writer therefore emits exactly one element per line, and the
reader/writer pair is byte-stable so saving unchanged objects does not touch the file's content.

Files named by ``$(FILE/...)`` macros are not migrated by the original 2.8.1 upgrade, which is
why they are listed and read here. After our upgrade the objects live in the 2.8.1 configuration
file (:mod:`appliance.config.configformat`); :mod:`appliance.config.store` reads and writes
them in whichever format is on disk, so their callers do not change.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import appliance_root, resolve_inside
from appliance.system.safexml import parse_xml

FILE_MACRO = re.compile(r"^\$\(FILE(/[^()\x00\n]*)\)$")
# base64("$(FILE/") starts with this; the guide greps for it.
FILE_MACRO_MARKER = "JChGSUxFL"

OBJECT_TYPES = (
    "emailaddresslist",
    "domainlist",
    "keywordlist",
    "sizelimit",
    "messagestore",
)

_SCHEMA_VERSION = "1.1"


@dataclass
class PolicyObject:
    """One policy object; ``file_path`` is the appliance path when the value is a macro."""

    id: str
    name: str
    type: str
    value: str
    file_path: str | None = field(default=None)

    def __post_init__(self) -> None:
        # Derived from the value so the two can never disagree.
        self.file_path = file_macro_path(self.value)


def file_macro_path(value: str) -> str | None:
    """Return ``/abs/path`` if ``value`` is exactly a ``$(FILE/abs/path)`` macro, else None."""
    match = FILE_MACRO.match(value.strip())
    return match.group(1) if match else None


def file_macro(appliance_path: str) -> str:
    """Build the ``$(FILE/...)`` macro value for an absolute appliance path."""
    if not appliance_path.startswith("/"):
        raise ValueError(f"appliance path must be absolute: {appliance_path!r}")
    value = f"$(FILE{appliance_path})"
    if file_macro_path(value) != appliance_path:
        raise ValueError(f"not usable in a $(FILE) macro: {appliance_path!r}")
    return value


def _decode(text: str, obj_id: str) -> str:
    try:
        return base64.b64decode(text.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise MalformedApplianceFile(f"policy object {obj_id}: value is not base64 UTF-8") from exc


def parse_policy_objects(data: bytes) -> list[PolicyObject]:
    """Parse the policy objects file's bytes (safely; see :mod:`appliance.system.safexml`)."""
    root = parse_xml(data)
    objects = []
    for element in root.iter("object"):
        obj_id = element.get("id")
        obj_type = element.get("type")
        if not obj_id or not obj_type:
            raise MalformedApplianceFile("policy object without id or type")
        name = element.findtext("name")
        value = element.findtext("value")
        if name is None or value is None:
            raise MalformedApplianceFile(f"policy object {obj_id} lacks <name> or <value>")
        objects.append(PolicyObject(obj_id, name, obj_type, _decode(value, obj_id)))
    return objects


def render_policy_objects(objs: Iterable[PolicyObject]) -> bytes:
    """Serialise objects in the appliance's one-element-per-line format."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<policyobjects version="{_SCHEMA_VERSION}">',
    ]
    seen: set[str] = set()
    for obj in objs:
        if obj.id in seen:
            raise ValueError(f"duplicate policy object id {obj.id!r}")
        seen.add(obj.id)
        if "\n" in obj.name or "\r" in obj.name:
            # A name over several lines would break the guide's grep -B 1 listing.
            raise ValueError(f"policy object {obj.id}: name must be a single line")
        encoded = base64.b64encode(obj.value.encode("utf-8")).decode("ascii")
        lines += [
            f"  <object id={quoteattr(obj.id)} type={quoteattr(obj.type)}>",
            f"    <name>{escape(obj.name)}</name>",
            f"    <value>{encoded}</value>",
            "  </object>",
        ]
    lines.append("</policyobjects>")
    return ("\n".join(lines) + "\n").encode("utf-8")


def object_file(obj: PolicyObject, root: Path | None = None) -> Path:
    """Host path of the file a macro object refers to, confined to the appliance root."""
    if obj.file_path is None:
        raise ValueError(f"policy object {obj.id} does not use a $(FILE) macro")
    return resolve_inside(appliance_root(root), obj.file_path)


def read_object_lines(obj: PolicyObject, root: Path | None = None) -> list[str]:
    """The entries of a list object: from its file for a macro, else from its value.

    Blank lines and ``#`` comments are dropped and surrounding whitespace stripped, which is
    how the mail-security engine reads such lists.
    """
    if obj.file_path is not None:
        text = object_file(obj, root).read_text(encoding="utf-8")
    else:
        text = obj.value
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
