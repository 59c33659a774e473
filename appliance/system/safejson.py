"""Reading the appliance's JSON: strictly when it comes from outside, and from files that may be
missing or damaged.

A document that names a key twice says two things, and which one a reader believes depends on
the parser; a signed or checksummed document (a firmware manifest, a backup's header) must say
one, so such a document is refused rather than read.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from appliance.system.errors import MalformedApplianceFile


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def loads_strict(data: bytes) -> Any:
    """The value of a UTF-8 JSON document in which no object names a key twice.

    Raises ``ValueError`` (a ``UnicodeDecodeError``, a syntax error, a key twice) or
    ``RecursionError`` (nesting too deep).
    """
    return json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)


def read_json(path: Path) -> Any:
    """The value of the JSON file ``path``; None when there is no such file.

    :class:`MalformedApplianceFile` when the file is not JSON: damage to report, not absence.
    """
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise MalformedApplianceFile(f"{path} is not valid JSON") from exc


def check_field_names(
    fields: Mapping[str, Any], expected: Collection[str], what: str, error: type[Exception]
) -> None:
    """Refuse a document that lacks one of ``expected`` or has a field beyond them.

    A signed document with an extra field says something no reader checks, so it is refused
    like a missing one. ``error`` is the caller's own exception class and ``what`` names the
    document in the message (``The license``), so administrators read one wording everywhere.
    """
    missing = [name for name in expected if name not in fields]
    if missing:
        raise error(f'{what} lacks the field "{missing[0]}".')
    unknown = sorted(set(fields) - set(expected))
    if unknown:
        raise error(f'{what} has an unknown field "{unknown[0]}".')
