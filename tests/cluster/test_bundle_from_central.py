"""Central's bundle endpoint (/cluster/bundles/<version>/<sha256>/): the verified bundle goes to
a member that signs its request with its key, resumable with Range; nobody else gets a byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from appliance.firmware import spool
from cluster import bundles, services, signing
from events.models import Event
from tests.support.feed_server import feed_server  # noqa: F401
from tests.upgrades.conftest import firmware, licensed, run_download, vendor  # noqa: F401
from upgrades.models import Download

pytestmark = pytest.mark.django_db

VERSION = "2.8.1.0"


@pytest.fixture
def served(central: str, firmware) -> tuple[Download, Path, str]:  # noqa: F811
    """Central with firmware 2.8.1.0 downloaded and verified, and member1 joined; returns the
    download, its published file and member1's secret."""
    firmware.offer(firmware.build())
    download = run_download()
    assert download.state == "ready", download.error
    _row, token = services.join_token_create(user="admin")
    _member, secret = services.member_join(
        node="member1", token_hash=signing.token_hash(token), info={"hostname": "mx2"}
    )
    path = spool.bundle_path(spool.bundle_id(download.version, download.sha256))
    return download, path, secret


def url(download: Download) -> str:
    return bundles.bundle_url("", download.version, download.sha256)


def signed(secret: str, download: Download, **kwargs: str) -> dict[str, str]:
    """The request header member1 sends (as its CentralSource seals it), as client kwargs."""
    header = bundles.request_header(
        signing.member_key(secret),
        sender=kwargs.get("sender", "member1"),
        recipient="central",
        version=kwargs.get("version", download.version),
        sha256=kwargs.get("sha256", download.sha256),
    )
    return {"HTTP_X_LMI_CLUSTER_REQUEST": header[bundles.HEADER]}


def body(response) -> bytes:
    return b"".join(response.streaming_content)


def test_it_sends_a_member_the_verified_bundle(served, client: Client) -> None:
    download, path, secret = served

    response = client.get(url(download), **signed(secret, download))

    assert response.status_code == 200
    assert response["ETag"] == f'"{download.sha256}"'
    assert int(response["Content-Length"]) == download.size
    assert body(response) == path.read_bytes()
    event = Event.objects.get(message=f"Sending firmware {VERSION} to member1")
    assert event.details["sha256"] == download.sha256


def test_it_resumes_from_a_byte_offset_with_range(served, client: Client) -> None:
    download, path, secret = served
    half = download.size // 2
    etag = f'"{download.sha256}"'

    response = client.get(url(download), HTTP_RANGE=f"bytes={half}-", HTTP_IF_RANGE=etag,
                          **signed(secret, download))  # fmt: skip

    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes {half}-{download.size - 1}/{download.size}"
    assert body(response) == path.read_bytes()[half:]
    assert Event.objects.filter(message=f"Sending firmware {VERSION} to member1 from byte {half}")

    # A part of another file (another ETag) starts over; a range past the end is refused.
    whole = client.get(url(download), HTTP_RANGE=f"bytes={half}-", HTTP_IF_RANGE='"other"',
                       **signed(secret, download))  # fmt: skip
    assert whole.status_code == 200 and body(whole) == path.read_bytes()
    beyond = client.get(
        url(download), HTTP_RANGE=f"bytes={download.size}-", **signed(secret, download)
    )
    assert beyond.status_code == 416


def test_it_refuses_a_request_without_a_member_signature(
    served, client: Client, admin_client: Client
) -> None:
    download, _path, _secret = served

    assert client.get(url(download)).status_code == 401
    # A console user is no member either: the session proves nothing here.
    assert admin_client.get(url(download)).status_code == 401
    # Signed with a key Central never gave out, or by a node that never joined.
    assert client.get(url(download), **signed("guessed", download)).status_code == 403
    assert client.get(url(download), **signed("guessed", download, sender="mx9")).status_code == 403
    assert client.get(url(download), HTTP_X_LMI_CLUSTER_REQUEST="bm90IGpzb24").status_code == 403
    refusals = Event.objects.filter(message__startswith="Refused a firmware bundle request")
    assert refusals.exists()
    assert not Event.objects.filter(message__startswith="Sending firmware")


def test_a_signed_request_is_good_once_and_for_its_own_bundle(served, client: Client) -> None:
    download, _path, secret = served
    headers = signed(secret, download)

    assert client.get(url(download), **headers).status_code == 200
    assert client.get(url(download), **headers).status_code == 403  # replayed
    other = signed(secret, download, sha256="ab" * 32)
    assert client.get(url(download), **other).status_code == 403


def test_only_a_bundle_central_has_verified_is_served(served, client: Client, settings) -> None:
    download, path, secret = served
    unknown = bundles.bundle_url("", VERSION, "ab" * 32)
    assert client.get(unknown, **signed(secret, download, sha256="ab" * 32)).status_code == 404

    Download.objects.filter(pk=download.pk).update(state="verifying")
    assert client.get(url(download), **signed(secret, download)).status_code == 404
    Download.objects.filter(pk=download.pk).update(state="ready")
    path.unlink()
    assert client.get(url(download), **signed(secret, download)).status_code == 404

    settings.CLUSTER_ROLE = "member"
    assert client.get(url(download), **signed(secret, download)).status_code == 404
