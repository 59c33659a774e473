"""A member fetches the firmware bundle from Cluster Central, not from the feed: Central (this
test's process, its console served by a live server) downloaded and verified it once; the member
(its own appliance root, database and var/, in a subprocess) downloads with its own downloader,
which takes the bytes from Central and checks them exactly as a feed download."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.firmware import license as appliance_license
from appliance.firmware import spool
from cluster import services, signing
from events.models import Event
from tests.cluster.nodes import Node, new_member
from tests.cluster.test_two_nodes import member_database  # noqa: F401
from tests.support.feed_server import feed_server  # noqa: F401
from tests.upgrades import bundles
from tests.upgrades.conftest import (  # noqa: F401
    Firmware,
    firmware,
    issue_license,
    licensed,
    run_download,
    vendor,
)

pytestmark = [pytest.mark.integration]

VERSION = "2.8.1.0"
# On the member: joined to Central (the row its join answer leaves), then Check now and
# update-control -d fw, as an administrator would; SEED_PART first puts the first bytes of the
# bundle in the spool, as a cut transfer leaves them.
MEMBER_DOWNLOAD = """
import json, pathlib
from appliance.firmware import spool
from cluster.models import CentralLink
from upgrades import downloader, services as s
CentralLink.objects.update_or_create(pk=1, defaults=dict(central="central", state="joined",
                                                          secret=SECRET))
assert s.update_check(trigger="user", user="admin").ok
d = s.download_start(user="admin", trigger="user", enqueue=False)
if SEED_PART:
    bundle = spool.bundle_id(d.version, d.sha256)
    spool.ensure_spool()
    spool.part_path(bundle).write_bytes(pathlib.Path(SOURCE).read_bytes()[:SEED_PART])
    spool.write_record(bundle, spool.PartRecord(url=d.url, size=d.size, sha256=d.sha256))
downloader.download_execute(d.pk)
d.refresh_from_db()
print("RESULT " + json.dumps({"state": d.state, "error": d.error, "rejected": d.rejected,
                              "sha256": d.sha256, "resumes": d.resumes}))
"""


@dataclass
class Cluster:
    central_download_sha256: str
    bundle: Path  # Central's verified copy in its spool
    source: Path  # the vendor's file the feed serves
    member: Node
    secret: str
    firmware: Firmware

    def member_download(self, seed_part: int = 0) -> dict[str, object]:
        code = (
            f"SECRET = {self.secret!r}\nSOURCE = {str(self.source)!r}\nSEED_PART = {seed_part}\n"
            + MEMBER_DOWNLOAD
        )
        return self.on_member(code)

    def on_member(self, code: str) -> dict[str, object]:
        """Run ``code`` in the member's shell; the JSON it prints after "RESULT "."""
        out = self.member.manage("shell", "-v", "0", "-c", code)
        line = next(row for row in out.splitlines() if row.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT "))

    def member_bundles(self) -> list[str]:
        """Bundles and part files in the member's var/spool/updates."""
        directory = spool.spool_dir(self.member.root)
        return sorted(p.name for p in directory.glob("firmware-*"))


@pytest.fixture
def cluster(
    live_server,
    settings,
    firmware: Firmware,  # noqa: F811
    vendor,  # noqa: F811
    member_database: Path,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
) -> Iterator[Cluster]:
    """Central (this process, serving on the live server) with 2.8.1.0 downloaded and verified
    from the feed; member1 licensed, joined, told where Central's console is."""
    settings.CLUSTER_ROLE = "central"
    settings.NODE_NAME = "central"
    source = firmware.build()
    firmware.offer(source)
    download = run_download()
    assert download.state == "ready", download.error
    _row, token = services.join_token_create(user="admin")
    _member, secret = services.member_join(
        node="member1", token_hash=signing.token_hash(token), info={"hostname": "mx2"}
    )
    member = new_member(
        "member1", tmp_path, member_database, redis_url, LMI_CLUSTER_CENTRAL_URL=live_server.url
    )
    appliance_license.install_license(issue_license(vendor), root=member.root)
    yield Cluster(
        central_download_sha256=download.sha256,
        bundle=spool.bundle_path(spool.bundle_id(download.version, download.sha256)),
        source=source,
        member=member,
        secret=secret,
        firmware=firmware,
    )


def bundle_requests(cluster: Cluster) -> list[object]:
    return list(cluster.firmware.server.downloads_of(cluster.source.name))


def test_a_member_downloads_the_bundle_from_central_not_from_the_feed(cluster: Cluster) -> None:
    from_feed = bundle_requests(cluster)
    assert len(from_feed) == 1  # Central's own download, the only one

    result = cluster.member_download()

    assert result["state"] == "ready", result["error"]
    assert bundle_requests(cluster) == from_feed  # the feed saw no bundle request from the member
    # What the member verified and published is Central's bundle, byte for byte.
    digest = cluster.central_download_sha256
    published = spool.bundle_path(spool.bundle_id(VERSION, digest), cluster.member.root)
    assert result["sha256"] == digest == bundles.sha256_of(published)
    assert published.read_bytes() == cluster.bundle.read_bytes()
    assert cluster.member_bundles() == [published.name]
    assert Event.objects.filter(message=f"Sending firmware {VERSION} to member1").count() == 1


def test_a_member_resumes_a_cut_fetch_from_central_with_range(cluster: Cluster) -> None:
    half = cluster.bundle.stat().st_size // 2

    result = cluster.member_download(seed_part=half)

    assert result["state"] == "ready", result["error"]
    assert result["resumes"] == 1
    assert Event.objects.filter(message=f"Sending firmware {VERSION} to member1 from byte {half}")
    assert len(bundle_requests(cluster)) == 1


def test_a_member_refuses_a_bundle_central_serves_tampered(cluster: Cluster) -> None:
    bundles.tamper_payload(cluster.bundle)  # Central's copy changed after it verified it

    result = cluster.member_download()

    assert result["state"] == "failed" and result["rejected"] is True
    # The very refusal of a tampered feed download (upgrades.downloader).
    assert "does not match the update feed's" in str(result["error"])
    assert cluster.member_bundles() == []  # no bundle, no part file kept
    assert len(bundle_requests(cluster)) == 1  # it did not go round Central to the feed


def test_a_member_downloads_from_the_feed_when_central_has_no_bundle(cluster: Cluster) -> None:
    cluster.bundle.unlink()  # Central's verified copy is gone (its spool was cleaned)

    result = cluster.member_download()

    assert result["state"] == "ready", result["error"]
    assert len(bundle_requests(cluster)) == 2  # Central's download, then the member's


# Central's rolling upgrade asks the member to install (the node_install_start message, sealed
# by Central with the member's key): with no bundle ready, the member fetches it from Central
# first, then starts its install (which may then stop at a preflight check of this machine).
INSTALL_REQUEST = """
import json
from cluster import rolling
from cluster.models import CentralLink
from upgrades.models import Download
CentralLink.objects.update_or_create(pk=1, defaults=dict(central="central", state="joined",
                                                          secret=SECRET))
rolling.member_install_start(message=json.loads(MESSAGE))
link = CentralLink.objects.get(pk=1)
print("RESULT " + json.dumps({"downloads": list(Download.objects.values_list("state", flat=True)),
                              "run_id": link.upgrade_run_id, "error": link.upgrade_error}))
"""


def test_a_rolling_upgrade_has_the_member_fetch_its_bundle_from_central(cluster: Cluster) -> None:
    message = signing.seal(
        signing.member_key(cluster.secret), kind="node_install_start", sender="central",
        recipient="member1",
        body={"upgrade_id": 7, "version": VERSION, "central_firmware": VERSION},
    )  # fmt: skip
    code = f"SECRET = {cluster.secret!r}\nMESSAGE = {json.dumps(message)!r}\n" + INSTALL_REQUEST

    result = cluster.on_member(code)

    assert result["downloads"] == ["ready"]
    assert "download" not in str(result["error"]), result["error"]
    assert result["run_id"] or result["error"], result
    assert len(bundle_requests(cluster)) == 1  # Central's own download was the only one
    assert Event.objects.filter(message=f"Sending firmware {VERSION} to member1").count() == 1
