"""The appliance's own seal on its configuration backups.

A backup file can come from anywhere: an upload, a copy on a share, a file someone edited. Its
checksums prove only that it is intact, not who made it, since anyone can recompute them. So
every backup this appliance makes carries a MAC (HMAC-SHA256) keyed with a secret that exists on
this appliance alone: 32 random bytes in ``var/lib/mailsec/backup.key``, created on first use,
mode 0600, never written into a configuration backup. A backup whose MAC verifies was made here
and not changed since; any other (from another appliance, from before this key, or altered) is
"unverified" and restored only after an administrator confirms the files it will write.

The MAC covers the header as stored (minus the MAC itself) and the SHA-256 of the unencrypted
payload, so it binds every byte a restore reads; for an encrypted backup it is checked once the
passphrase has opened the payload.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from appliance.system.atomic import fsync_dir
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout

KEY_BYTES = 32
MAC_FIELD = "mac"
_DOMAIN = b"LMIBAK-MAC1\n"  # so this key's MACs can never be confused with another use of it


def appliance_key(root: Path | None = None, *, create: bool = False) -> bytes | None:
    """This appliance's backup key; None when there is none yet and ``create`` is false.

    Creation is race-free: the key is written whole to a private temporary file, then linked to
    its name, which fails if another process got there first (then that key is used).
    """
    path = layout(root).backup_key
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            return None
        return _create(path)


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) != KEY_BYTES:
        raise MalformedApplianceFile(
            f"{path.name}: the backup key has {len(data)} bytes instead of {KEY_BYTES}"
        )
    return data


def _create(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, key)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return _read(path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return key


def _message(header: dict[str, Any], content_sha256: str) -> bytes:
    unsigned = {name: value for name, value in header.items() if name != MAC_FIELD}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _DOMAIN + canonical.encode("ascii") + b"\n" + content_sha256.encode("ascii")


def backup_mac(key: bytes, header: dict[str, Any], content_sha256: str) -> str:
    """The MAC of a backup: its header without the MAC field, and its payload's digest."""
    return hmac.new(key, _message(header, content_sha256), hashlib.sha256).hexdigest()


def mac_valid(key: bytes | None, header: dict[str, Any], content_sha256: str) -> bool:
    """True when the header carries a MAC this appliance's key made over this content."""
    claimed = header.get(MAC_FIELD)
    if key is None or not isinstance(claimed, str):
        return False
    return hmac.compare_digest(claimed, backup_mac(key, header, content_sha256))
