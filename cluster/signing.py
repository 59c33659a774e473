"""Signed messages between cluster nodes: ``seal`` on the sender, ``open_sealed`` on the receiver.

The nodes share a Redis broker, and whoever can write to it can put any task on any node's
queue. So every message one node sends another (``cluster.tasks``) is one argument, an
envelope::

    {"v": 1, "kind": "node_install_start", "from": "central", "to": "member1",
     "ts": 1764160000, "nonce": "<32 hex>", "body": {...}, "mac": "<64 hex>"}

``mac`` is HMAC-SHA256, under a key only the two nodes hold, of the canonical JSON (sorted keys,
no spaces, ASCII) of everything else. Without the key a message cannot be made, nor changed
(its kind, its addressee, its body), so a node's name alone proves nothing any more. A copy
sent again is refused by its nonce (recorded in ``ReceivedNonce``, unique), an old one by its
timestamp (``MAX_AGE``), so the nonces need keeping only that long.

The keys, and why both sides can compute them while the broker never carries them:

- A member's key (every message after the join, both ways) is the SHA-256 (hex) of the secret
  Central gave the member when it joined. It is exactly what Central has kept of that secret
  since the first version (``ClusterMember.secret_hash``), so members joined before messages
  were signed keep working once both nodes run this code; the member derives it from the
  secret it stores. Whoever reads either node's database can sign as that pair; a verifier of
  an HMAC must hold its key, so this cannot be helped without public-key signatures.
- A join's key is HMAC-SHA256(token, "lmi cluster join") (hex). Central computes it when it
  creates the token and keeps it beside the token's SHA-256 (``JoinToken.key``); the member
  computes it from the token the administrator gave it. The request names its token by the
  token's SHA-256 (what Central finds it by); neither that nor anything on the broker reveals
  the token or the key. Central's answer is signed with the same key and carries the new member
  secret encrypted (Fernet) under a key derived from the join key with HKDF, so the member
  secret never travels in clear either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.db import IntegrityError, transaction
from django.utils import timezone

from cluster.models import ReceivedNonce

VERSION = 1
# A message older than this is refused: it bounds how long a nonce is kept and how long a
# captured message could be replayed. Senders repeat what matters (reports every interval,
# install requests until answered), so a message that waited too long in a queue costs a delay.
MAX_AGE = timedelta(minutes=5)
# A message this far ahead of our clock is still accepted (the nodes' clocks differ a little).
MAX_SKEW = timedelta(minutes=1)

SIGNED_FIELDS = ("v", "kind", "from", "to", "ts", "nonce", "body")
NONCE_RE = re.compile(r"[0-9a-f]{32}")
MAC_RE = re.compile(r"[0-9a-f]{64}")
HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")
MAX_NAME = 255  # a claimed sender or addressee longer than this is not worth reading

# (sender, body) -> the key to check the message with, or Refused (unknown sender, no key).
KeyFor = Callable[[str, dict[str, Any]], str]


class Refused(Exception):
    """A message this node does not accept. The text is the reason, for the event: it never
    contains a key, a secret or the message's body."""


@dataclass(frozen=True)
class Opened:
    """A message whose signature, age and nonce checked out: its sender is who it says."""

    kind: str
    sender: str
    recipient: str
    sent_at: datetime
    nonce: str
    body: dict[str, Any]


# --- keys -----------------------------------------------------------------------------------


def token_hash(token: str) -> str:
    """How Central stores and finds a join token (``JoinToken.token_hash``); safe to send."""
    return hashlib.sha256(token.encode()).hexdigest()


def join_key(token: str) -> str:
    """The key of one join's two messages (request and answer), from the join token."""
    return hmac.new(token.encode(), b"lmi cluster join", hashlib.sha256).hexdigest()


def member_key(secret: str) -> str:
    """A member's key, from the member secret; Central stores this and never the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _fernet(key: str) -> Fernet:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"lmi cluster member secret"
    ).derive(key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def secret_encrypt(key: str, secret: str) -> str:
    """The member secret as Central's join answer carries it (encrypted under the join key)."""
    return _fernet(key).encrypt(secret.encode()).decode()


def secret_decrypt(key: str, sealed: Any) -> str:
    """The member secret from a join answer; Refused when it does not decrypt."""
    try:
        return _fernet(key).decrypt(str(sealed).encode()).decode()
    except (InvalidToken, UnicodeDecodeError) as exc:
        raise Refused("the member secret in it does not decrypt with this join's key") from exc


# --- envelopes ------------------------------------------------------------------------------


def _canonical(fields: dict[str, Any]) -> bytes:
    # default=str: a body the broker's JSON decoded into something else (kombu turns some
    # tagged dicts into objects) must not crash the check; it just will not match.
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    ).encode()


def _mac(key: str, fields: dict[str, Any]) -> str:
    return hmac.new(key.encode(), _canonical(fields), hashlib.sha256).hexdigest()


def seal(
    key: str,
    *,
    kind: str,
    sender: str,
    recipient: str,
    body: dict[str, Any],
    now: datetime | None = None,
) -> dict[str, Any]:
    """The envelope of one message, signed with ``key``.

    The body goes through JSON first, so the receiver checks the very values the broker
    delivers (tuples become lists, keys strings) and a body JSON cannot carry fails here.
    """
    moment = now or timezone.now()
    fields: dict[str, Any] = {
        "v": VERSION,
        "kind": kind,
        "from": sender,
        "to": recipient,
        "ts": int(moment.timestamp()),
        "nonce": secrets.token_hex(16),
        "body": json.loads(json.dumps(body)),
    }
    return {**fields, "mac": _mac(key, fields)}


def _well_formed(message: Any) -> dict[str, Any]:
    """The signed fields of something that looks like an envelope, or Refused."""
    if not isinstance(message, dict) or set(message) != {*SIGNED_FIELDS, "mac"}:
        raise Refused("it is not a signed message")
    checks = (
        message["v"] == VERSION and not isinstance(message["v"], bool),
        isinstance(message["kind"], str),
        isinstance(message["from"], str) and 0 < len(message["from"]) <= MAX_NAME,
        isinstance(message["to"], str) and len(message["to"]) <= MAX_NAME,
        isinstance(message["ts"], int) and not isinstance(message["ts"], bool),
        isinstance(message["nonce"], str) and NONCE_RE.fullmatch(message["nonce"]),
        isinstance(message["body"], dict),
        isinstance(message["mac"], str) and MAC_RE.fullmatch(message["mac"]),
    )
    if not all(checks):
        raise Refused("it is not a signed message")
    return {name: message[name] for name in SIGNED_FIELDS}


def open_sealed(
    message: Any, *, kind: str, recipient: str, key: KeyFor, now: datetime | None = None
) -> Opened:
    """Check one received message and record its nonce; the message, or Refused (why).

    In this order: its shape, that it is the ``kind`` the receiving task handles and is
    addressed to ``recipient`` (this node), its signature under the key ``key`` gives for the
    claimed sender (which may itself refuse: an unknown member, no join pending), then its age
    and its nonce. Only a message with a good signature reaches the clock and the nonce table,
    so a forger can neither fill that table nor learn anything from a timing refusal.

    The nonce is inserted in the caller's transaction and its unique constraint decides (no
    read first): of two deliveries of one message, racing or not, exactly one is accepted.
    """
    fields = _well_formed(message)
    if fields["kind"] != kind:
        raise Refused(f"it is a {fields['kind'][:40]!r} message, not {kind!r}")
    if fields["to"] != recipient:
        raise Refused(f"it is addressed to {fields['to'][:64]!r}, not to this node")
    secret = key(fields["from"], fields["body"])
    if not HEX_KEY_RE.fullmatch(secret) or not hmac.compare_digest(
        _mac(secret, fields), message["mac"]
    ):
        raise Refused("its signature is wrong")
    moment = now or timezone.now()
    try:
        sent_at = datetime.fromtimestamp(fields["ts"], UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise Refused("its timestamp is not a time") from exc
    # Reasons without figures: the same refusal repeated reads the same (one event).
    if sent_at < moment - MAX_AGE:
        raise Refused(
            f"it was sent more than {int(MAX_AGE.total_seconds())} s ago: a replay, a message "
            "that waited too long in a queue, or the nodes' clocks differ"
        )
    if sent_at > moment + MAX_SKEW:
        raise Refused(
            f"it is dated more than {int(MAX_SKEW.total_seconds())} s in the future: the "
            "nodes' clocks differ (keep them in time with NTP)"
        )
    _nonce_record(fields, expires_at=sent_at + MAX_AGE, now=moment)
    return Opened(
        kind=kind,
        sender=fields["from"],
        recipient=fields["to"],
        sent_at=sent_at,
        nonce=fields["nonce"],
        body=fields["body"],
    )


def _nonce_record(fields: dict[str, Any], *, expires_at: datetime, now: datetime) -> None:
    """Record a nonce, or Refused when it is already there; forget nonces too old to matter.

    A nonce is kept until its message would be refused for its age anyway: from then on the
    timestamp refuses a replay, so the table holds a few minutes of messages, whatever the
    cluster's size or age.
    """
    ReceivedNonce.objects.filter(expires_at__lt=now).delete()
    try:
        with transaction.atomic():
            ReceivedNonce.objects.create(
                nonce=fields["nonce"],
                sender=fields["from"][:64],
                kind=fields["kind"][:32],
                expires_at=expires_at,
            )
    except IntegrityError:
        raise Refused(
            "it was received before (a replay, or the broker delivered it twice)"
        ) from None
