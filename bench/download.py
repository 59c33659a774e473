"""Benchmark: firmware download plus verification against a plain copy of the same file.

Builds a signed bundle of about 1 GB in a temporary directory (``build_bundle`` over a tree of
large random files), serves it from a loopback HTTP server (tests/support/feed_server.py, the
one the tests use), and in the same run measures:

- the console's download: ``download_start`` + ``download_execute``, the function the Celery
  task and ``update-control -d fw`` run: streaming into var/spool/updates with the whole-file
  SHA-256 and the payload's computed on the way (one thread each), progress written to the
  database, then ``verify_bundle`` (signature, the payload digest from the transfer against the
  signed one, tar members), the fsync and the rename into place;
- a plain copy: ``urllib.request.urlopen`` read in 1 MiB blocks and written to a file.

Both are measured twice: with the server unthrottled (a loopback copy, where every CPU cycle
shows) and throttled to a 1 Gbit/s link (``--link-mbit``), where the hashing done during the
transfer hides in the waits for the network. Each is run ``--repeat`` times, alternating,
against a temporary SQLite database and appliance root; the best of each is compared.
Everything is deleted at the end.

Run: `.venv/bin/python bench/download.py [--size-mb 1024] [--repeat 3] [--link-mbit 1000]
[--json]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _report import add_json_flag, emit, ratio  # bench/ is sys.path[0]

BASE_DIR = Path(__file__).resolve().parent.parent
FILE_MB = 128


def build_tree(directory: Path, size_mb: int) -> None:
    """Files of random bytes (incompressible, like a real system image) adding up to size_mb."""
    rng = random.Random(281)
    left = size_mb
    index = 0
    (directory / "etc").mkdir(parents=True)
    (directory / "etc" / "SuSE-release").write_text("SUSE Linux Enterprise Server 11 (x86_64)\n")
    while left > 0:
        chunk = min(FILE_MB, left)
        path = directory / "usr" / "lib" / f"part-{index:02d}.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            for _ in range(chunk):
                handle.write(rng.randbytes(1024 * 1024))
        left -= chunk
        index += 1


def plain_copy(url: str, target: Path) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response, target.open("wb") as out:
        while block := response.read(1024 * 1024):
            out.write(block)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--link-mbit", type=float, default=1000.0, help="the throttled run's rate")
    add_json_flag(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmi-bench-download-"))
    try:
        run(work, args.size_mb, args.repeat, args.link_mbit, as_json=args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, size_mb: int, repeat: int, link_mbit: float, *, as_json: bool) -> None:
    link_rate = link_mbit * 1e6 / 8  # bytes per second
    sys.path.insert(0, str(BASE_DIR))
    from appliance.firmware.signing import generate_keypair, public_key_b64

    private, public = generate_keypair()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "lmi.settings",
            "LMI_VAR_DIR": str(work / "var"),
            "LMI_APPLIANCE_ROOT": str(work / "appliance"),
            "LMI_TRUSTED_KEYS": public_key_b64(public),
            "LMI_TRUSTED_KEYS_DIR": str(work / "keys"),
            "LMI_LOG_LEVEL": "WARNING",
        }
    )
    os.environ.pop("LMI_DATABASE_URL", None)
    import django

    django.setup()
    from datetime import date, timedelta

    from django.conf import settings
    from django.core.management import call_command

    from appliance.demo import init_demo
    from appliance.firmware import bundle, bundlebuild, license
    from tests.support.feed_server import FeedServer
    from upgrades import services

    call_command("migrate", verbosity=0)
    init_demo(messages=0, graph_days=0)
    license.install_license(
        license.sign_license(
            private,
            customer="Bench",
            serial="KQ7R2M4",
            updates_until=date.today() + timedelta(days=30),
        )
    )

    served = work / "served"
    served.mkdir()
    print(f"Building a {size_mb} MB bundle ...", flush=True)
    started = time.perf_counter()
    build_tree(work / "image", size_mb)
    path = served / "lmi-firmware-2.8.1.0.bundle"
    bundlebuild.build_bundle(
        work / "image",
        path,
        private_key=private,
        version="2.8.1.0",
        min_version="2.8.0.0",
        msgstore_format="2.8.1",
        config_format="2.8.1",
        os_release="SUSE Linux Enterprise Server 11",
        release_notes="Benchmark bundle",
    )
    shutil.rmtree(work / "image")
    size = path.stat().st_size
    _, digest = bundle.file_sha256(path)
    (served / "feed.json").write_text(
        '{"format": 1, "bundles": [{"version": "2.8.1.0", "min_version": "2.8.0.0", '
        f'"file": "{path.name}", "size": {size}, "sha256": "{digest}"}}]}}'
    )
    print(f"  built in {time.perf_counter() - started:.1f} s: {size / 1e6:.0f} MB", flush=True)

    server = FeedServer(served).start()
    settings.UPDATE_FEED_URL = server.base_url
    url = server.url(path.name)
    assert services.update_check(trigger="cli").ok

    started = time.perf_counter()
    bundle.verify_bundle(path)
    verify_alone = time.perf_counter() - started
    hash_alone = sha256_alone(path)

    results = []
    for label, rate in (
        ("loopback, unthrottled", None),
        (f"loopback at {link_mbit:g} Mbit/s", link_rate),
    ):
        server.rate = rate
        results.append((label, *measure(url, work, repeat)))
    server.stop()

    mb = size / 1e6
    print()
    print(f"Bundle: {mb:.0f} MB over http://127.0.0.1, best of {repeat}")
    print(
        f"verify_bundle alone (page cache warm): {verify_alone:.2f} s, {mb / verify_alone:.0f} MB/s"
    )
    for label, copy, total, transfer in results:
        verify = total - transfer
        print()
        print(f"{label:40}{'seconds':>9}{'MB/s':>9}")
        print(f"{'  Plain copy (urllib read, file write)':40}{copy:9.2f}{mb / copy:9.0f}")
        print(f"{'  Download + verification (service)':40}{total:9.2f}{mb / total:9.0f}")
        print(f"{'    transfer, both SHA-256 inline':40}{transfer:9.2f}{mb / transfer:9.0f}")
        print(f"{'    verify_bundle, fsync, rename':40}{verify:9.2f}{mb / verify:9.0f}")
        print(f"  Download + verification at {copy / total:.0%} of the plain copy's speed")
    ceiling = ratio(results[0][1], hash_alone)
    ceiling = min(1.0, ceiling) if ceiling is not None else None
    print()
    print(
        f"One SHA-256 pass alone (page cache warm): {hash_alone:.2f} s, {mb / hash_alone:.0f} MB/s:"
        f" a download that hashes every byte once can reach at most "
        f"{ceiling or 0:.0%} of the unthrottled plain copy here"
    )
    if as_json:
        runs = {
            key: {
                "plain_copy_s": copy,
                "download_s": total,
                "transfer_s": transfer,
                "verify_s": total - transfer,
                "download_mb_s": ratio(mb, total),
                "ratio_to_plain_copy": ratio(copy, total),  # speed relative to the plain copy
            }
            for key, (_, copy, total, transfer) in zip(
                ("unthrottled", "throttled"), results, strict=True
            )
        }
        emit(
            "download",
            mb=mb,
            repeat=repeat,
            link_mbit=link_mbit,
            verify_alone_s=verify_alone,
            # The ceiling this machine puts on any download that checks a SHA-256 of every byte:
            # the plain copy's time over one hash pass's (1.0 = the hash is not the limit).
            sha256_alone_s=hash_alone,
            ceiling_one_hash=ceiling,
            ratio_to_plain_copy=runs["unthrottled"]["ratio_to_plain_copy"],
            # Throttled: the download's speed against the link's own (1.0 = line rate).
            ratio_to_link=ratio(mb / runs["throttled"]["download_s"], link_rate / 1e6),
            **runs,
        )


def sha256_alone(path: Path) -> float:
    """Seconds for one SHA-256 pass over ``path`` (read from the page cache, 8 MiB blocks)."""
    digest = hashlib.sha256()
    buffer = bytearray(8 * 2**20)
    view = memoryview(buffer)
    started = time.perf_counter()
    with path.open("rb", buffering=0) as source:
        while read := source.readinto(buffer):
            digest.update(view[:read])
    return time.perf_counter() - started


def measure(url: str, work: Path, repeat: int) -> tuple[float, float, float]:
    """Best plain copy, and the best download's total and transfer-phase seconds."""
    from appliance.firmware import spool
    from upgrades import downloader, services
    from upgrades.models import Download, DownloadState, DownloadTrigger

    copies: list[float] = []
    downloads: list[tuple[float, float]] = []
    for _ in range(repeat):
        copies.append(plain_copy(url, work / "copy.bin"))
        download = services.download_start(user="bench", trigger=DownloadTrigger.CLI, enqueue=False)
        phases: dict[str, float] = {}

        def note(row: Download, phases: dict[str, float] = phases) -> None:
            if row.state == DownloadState.VERIFYING and "verifying" not in phases:
                phases["verifying"] = time.perf_counter()

        started = time.perf_counter()
        state = downloader.download_execute(download.pk, on_progress=note)
        total = time.perf_counter() - started
        assert state == DownloadState.READY, Download.objects.get(pk=download.pk).error
        downloads.append((total, phases["verifying"] - started))
        # The spool names a bundle by version and SHA-256 (its "bundle id"); remove the ready
        # one so the next round downloads the whole file again instead of finding it there.
        spool.discard_bundle(spool.bundle_id(download.version, download.sha256))
        Download.objects.all().delete()
    best_total, best_transfer = min(downloads)
    return min(copies), best_total, best_transfer


if __name__ == "__main__":
    main()
