"""cluster.signing on its own: a sealed message opens only unchanged, under its key, for its
kind and addressee, once, and while it is fresh; join keys and the member secret's encryption."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.utils import timezone

from cluster import signing
from cluster.models import ReceivedNonce

KEY = signing.member_key("s3cret")


def sealed(**kwargs) -> dict:
    fields = {"kind": "central_update", "sender": "central", "recipient": "member1",
              "body": {"firmware": "2.8.0.0", "events_cursor": 3}}  # fmt: skip
    return signing.seal(KEY, **{**fields, **kwargs})


def open_(message, *, key: str = KEY, kind: str = "central_update", recipient: str = "member1"):
    return signing.open_sealed(message, kind=kind, recipient=recipient, key=lambda *_: key)


def test_a_sealed_message_opens_with_its_key(db) -> None:
    opened = open_(sealed())
    assert (opened.kind, opened.sender, opened.recipient) == (
        "central_update",
        "central",
        "member1",
    )
    assert opened.body == {"firmware": "2.8.0.0", "events_cursor": 3}
    assert abs(opened.sent_at - timezone.now()) < timedelta(seconds=5)


def test_the_body_is_signed_as_the_broker_delivers_it(db) -> None:
    message = sealed(body={"events": ({"id": 1},), "details": {1: "x"}})
    assert message["body"] == {"events": [{"id": 1}], "details": {"1": "x"}}
    assert open_(message).body == message["body"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body", {"firmware": "9.9.9.9", "events_cursor": 3}),
        ("from", "rogue"),
        ("ts", 0),
        ("nonce", "0" * 32),
        ("v", 2),
        ("mac", "0" * 64),
        ("mac", "not hex"),
    ],
)
def test_any_change_to_a_sealed_message_is_refused(db, field: str, value) -> None:
    message = {**sealed(), field: value}
    with pytest.raises(signing.Refused):
        open_(message)
    assert not ReceivedNonce.objects.exists()


@pytest.mark.parametrize("message", [None, [], "x", {}, {"kind": "central_update"}])
def test_what_is_not_an_envelope_is_refused(db, message) -> None:
    with pytest.raises(signing.Refused, match="not a signed message"):
        open_(message)


def test_a_message_opens_only_as_its_kind_for_its_addressee_under_its_key(db) -> None:
    with pytest.raises(signing.Refused, match="not 'node_install_start'"):
        open_(sealed(), kind="node_install_start")
    with pytest.raises(signing.Refused, match="addressed to 'member1'"):
        open_(sealed(), recipient="member2")
    with pytest.raises(signing.Refused, match="signature is wrong"):
        open_(sealed(), key=signing.member_key("other"))
    with pytest.raises(signing.Refused, match="signature is wrong"):
        open_(sealed(), key="")


def test_a_message_opens_once(db) -> None:
    message = sealed()
    open_(message)
    with pytest.raises(signing.Refused, match="received before"):
        open_(message)
    assert ReceivedNonce.objects.count() == 1


def test_the_nonce_table_refuses_a_second_row_by_itself(db) -> None:
    """The insert decides (a unique constraint), not a read before it."""
    when = timezone.now()
    ReceivedNonce.objects.create(nonce="a" * 32, sender="c", kind="k", expires_at=when)
    with pytest.raises(IntegrityError):
        ReceivedNonce.objects.create(nonce="a" * 32, sender="c", kind="k", expires_at=when)


def test_freshness_window(db) -> None:
    now = timezone.now()
    too_old = now - signing.MAX_AGE - timedelta(seconds=2)
    too_new = now + signing.MAX_SKEW + timedelta(seconds=2)
    with pytest.raises(signing.Refused, match="sent more than 300 s ago"):
        open_(sealed(now=too_old))
    with pytest.raises(signing.Refused, match="in the future"):
        open_(sealed(now=too_new))
    open_(sealed(now=now - signing.MAX_AGE + timedelta(seconds=5)))
    open_(sealed(now=now + signing.MAX_SKEW - timedelta(seconds=5)))


def test_join_keys_and_the_member_secret_encryption() -> None:
    token = "t" * 32
    key = signing.join_key(token)
    assert len(key) == 64 and token not in key
    assert key not in (signing.token_hash(token), signing.join_key("u" * 32))
    encrypted = signing.secret_encrypt(key, "s3cret")
    assert "s3cret" not in encrypted
    assert signing.secret_decrypt(key, encrypted) == "s3cret"
    with pytest.raises(signing.Refused, match="does not decrypt"):
        signing.secret_decrypt(signing.join_key("u" * 32), encrypted)
    with pytest.raises(signing.Refused, match="does not decrypt"):
        signing.secret_decrypt(key, None)
