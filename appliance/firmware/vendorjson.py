"""Reading a JSON document the vendor publishes (the update feed, a license file) from bytes.

Both come from outside and are read the same way: bytes only, no larger than the caller's
limit, and strictly: a document that names a key twice says two things, and which one a reader
believes depends on the parser, so it is refused like one that is not JSON at all.
"""

from __future__ import annotations

from typing import Any

from appliance.system.safejson import loads_strict


def load_vendor_json(
    data: bytes,
    limit: int,
    error: type[Exception],
    *,
    not_bytes: str,
    too_large: str,
    not_json: str,
) -> Any:
    """The value of ``data``, a UTF-8 JSON document of at most ``limit`` bytes.

    Otherwise raises ``error``, the caller's exception class, with the caller's wording:
    ``not_bytes`` for a value that is not bytes, ``too_large`` (which may name ``{size}`` and
    ``{limit}``) for a document over the limit, ``not_json`` for one that is not UTF-8 JSON,
    nests too deep or names a key twice in one object.
    """
    if not isinstance(data, bytes | bytearray):
        raise error(not_bytes)
    if len(data) > limit:
        raise error(too_large.format(size=len(data), limit=limit))
    try:
        return loads_strict(bytes(data))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        raise error(not_json) from None
