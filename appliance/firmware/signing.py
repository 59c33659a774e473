"""The vendor's Ed25519 keys and signatures: what a firmware bundle and a licence are signed with.

A console trusts the public keys in ``settings.TRUSTED_KEYS`` and in ``*.pub`` files of
``settings.TRUSTED_KEYS_DIR``; whatever is signed is signed in :func:`canonical_json` form.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

logger = logging.getLogger(__name__)
logger = logging.getLogger(__name__)


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 signing key: (private key, public key), raw 32 bytes each."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    """The raw public key belonging to a raw private key."""
    return load_private_key(private_key).public_key().public_bytes_raw()


def key_id(public: bytes) -> str:
    """The short name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def public_key_b64(public: bytes) -> str:
    """The base64 form of a raw public key, as LMI_TRUSTED_KEYS and ``*.pub`` files hold it."""
    return base64.b64encode(public).decode("ascii")


def decode_key(text: str) -> bytes:
    """Decode one base64 key (private or public) into its raw 32 bytes; ``ValueError`` if not."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError("not valid base64") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 key has 32 bytes, this one has {len(raw)}")
    return raw


def read_key_file(path: Path) -> bytes:
    """Read a key file of one base64 line (``vendor.key`` or a ``*.pub``) into raw bytes."""
    try:
        return decode_key(Path(path).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} does not hold an Ed25519 key: {exc}") from exc


def trusted_keys() -> list[bytes]:
    """The public keys this console trusts: ``settings.TRUSTED_KEYS`` and ``*.pub`` files.

    A bad entry (not base64, not 32 bytes, unreadable) is skipped with a warning rather than
    stopping every update check; duplicates are dropped.
    """
    from django.conf import settings

    keys: list[bytes] = []
    for index, text in enumerate(getattr(settings, "TRUSTED_KEYS", None) or []):
        try:
            keys.append(decode_key(text))
        except ValueError as exc:
            logger.warning("Ignoring entry %d of LMI_TRUSTED_KEYS: %s", index + 1, exc)
    directory = getattr(settings, "TRUSTED_KEYS_DIR", None)
    if directory:
        try:
            paths = sorted(Path(directory).glob("*.pub"))
        except OSError as exc:
            logger.warning("Cannot list trusted keys in %s: %s", directory, exc)
            paths = []
        for path in paths:
            try:
                keys.append(read_key_file(path))
            except ValueError as exc:
                logger.warning("Ignoring trusted key file: %s", exc)
    unique: list[bytes] = []
    for key in keys:
        if key not in unique:
            unique.append(key)
    return unique


def load_private_key(raw: bytes) -> Ed25519PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("an Ed25519 private key is 32 raw bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def canonical_json(value: Any) -> bytes:
    """The one byte form a signature covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signing_key_for(message: bytes, signature: bytes, keys: list[bytes]) -> bytes | None:
    """The trusted key whose signature ``signature`` is over ``message``, or None."""
    for key in keys:
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
        except (InvalidSignature, ValueError):
            continue
        return key
    return None
