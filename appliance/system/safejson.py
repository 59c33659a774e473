"""Reading the appliance's JSON: strictly when it comes from outside, and from files that may be
missing or damaged.

A document that names a key twice says two things, and which one a reader believes depends on
the parser; a signed or checksummed document (a firmware manifest, a backup's header) must say
one, so such a document is refused rather than read.
"""

from __future__ import annotations

import json
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
