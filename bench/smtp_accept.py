"""Benchmark: SMTP acceptance by the real mail processing service, against a bare sink.

Starts `manage.py smtp_service` on a free loopback port against a temporary demo appliance
(``init_demo(root, messages=100)``) and a temporary console database, and sends N messages with
1, 4 and 16 concurrent clients: threads using smtplib, each reusing one connection for all of
its messages. The mix is 80% clean mail (policy checked, spooled durably, moved to the local
sink in the background), 15% spam and 5% with the EICAR test file in a base64 attachment (both
committed to the message store with fsync before the 250). The same client load then goes to a
bare aiosmtpd server that accepts and discards, in a process of its own, so the ratio shows
what the policy and the durability cost.

Run: `.venv/bin/python bench/smtp_accept.py [--messages N] [--concurrency 1,4,16] [--json]`.

Reading the figures: every clean message is a new spool file, and on ext4 without a journal (the
development VM's root filesystem) making a file scans past inodes deleted in the last minutes
(``recently_deleted`` in the kernel): 0.3-0.9 ms of kernel time each, depending on what other
processes deleted nearby. The temporary appliance lives under $TMPDIR with every test's files,
so the service's figures move with the machine's other work far more than the bare sink's
(which writes nothing): compare runs made alternately, close together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from _common import spool_drain  # noqa: E402 - bench/ is sys.path[0]
from _report import add_json_flag, emit, ratio  # noqa: E402

from appliance.mail.eicar import EICAR  # noqa: E402 - plain bytes, no Django needed

CLIENT_NAME = "bench.test"  # smtplib would otherwise look up socket.getfqdn()
BODY = (
    "Hi all,\n\nThanks for joining today. Action items are below; please update the tracker by "
    "Friday.\n\n- finish the migration plan\n- book the review room\n"
) * 12  # about 2 KB of text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_banner(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.makefile("rb").readline().startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not answer")


def messages(count: int) -> list[tuple[str, bytes]]:
    """(sender, raw message) pairs: 80% clean, 15% spam, 5% virus, in a fixed interleave."""
    built = []
    for number in range(count):
        kind = number % 20
        msg = EmailMessage()
        msg["To"] = f"user{number % 50}@example.com"
        msg["Date"] = "Tue, 01 Oct 2013 12:00:00 +0000"
        msg["Message-ID"] = f"<bench.{number}@elsewhere.test>"
        if kind < 3:
            sender = f"promo{number}@deals.test"
            msg["Subject"] = "You have won - limited offer"
            msg.set_content("No prescription needed. Limited offer!\n" + BODY)
        elif kind == 3:
            sender = "invoice@billing.test"
            msg["Subject"] = f"Invoice {number} overdue"
            msg.set_content("Please open the attached invoice.\n")
            msg.add_attachment(EICAR, maintype="application", subtype="zip", filename="inv.zip")
        else:
            sender = f"colleague{number % 30}@elsewhere.test"
            msg["Subject"] = f"Re: project status {number}"
            msg.set_content(BODY)
        msg["From"] = sender
        built.append((sender, msg.as_bytes(policy=SMTP)))
    return built


@dataclass
class Result:
    concurrency: int
    seconds: float
    latencies: list[float]
    server_cpu: float = 0.0  # seconds of CPU the server process used during the run

    @property
    def cpu_ms(self) -> float:
        """Server CPU per message, in ms."""
        return self.server_cpu / len(self.latencies) * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def load(port: int, batch: list[tuple[str, bytes]], concurrency: int) -> Result:
    """Send the batch over ``concurrency`` connections at once; every message must get 250."""
    shares = [batch[index::concurrency] for index in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in shares]
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)

    def client(index: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=60) as smtp:
                smtp.ehlo()
                start.wait()
                for sender, raw in shares[index]:
                    began = time.perf_counter()
                    refused = smtp.sendmail(sender, ["user@example.com"], raw)
                    latencies[index].append(time.perf_counter() - began)
                    if refused:
                        raise RuntimeError(f"refused: {refused}")
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise SystemExit(f"client failed: {errors[0]!r}")
    return Result(concurrency, seconds, [value for share in latencies for value in share])


def measured(
    server: subprocess.Popen[bytes], port: int, batch: list[tuple[str, bytes]], concurrency: int
) -> Result:
    """:func:`load`, with the server process's CPU time over the run (user + system)."""
    import psutil

    process = psutil.Process(server.pid)
    before = process.cpu_times()
    result = load(port, batch, concurrency)
    after = process.cpu_times()
    result.server_cpu = (after.user - before.user) + (after.system - before.system)
    return result


def bare_sink(port: int) -> None:
    """A bare aiosmtpd server that answers 250 to every message and keeps nothing."""
    from aiosmtpd.smtp import SMTP as Server

    class Discard:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(
            lambda: Server(Discard(), hostname="sink.test", loop=loop), "127.0.0.1", port
        )
        await stop.wait()
        server.close()

    asyncio.run(main())


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=out, stderr=out)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--bare-sink", type=int, help=argparse.SUPPRESS)
    add_json_flag(parser)
    args = parser.parse_args()
    if args.bare_sink:
        bare_sink(args.bare_sink)
        return
    levels = [int(level) for level in args.concurrency.split(",")]
    batch = messages(args.messages)

    with tempfile.TemporaryDirectory(prefix="lmi-smtp-bench-") as tmp:
        work = Path(tmp)
        root = work / "appliance"
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "lmi.settings",
                "LMI_VAR_DIR": str(work / "var"),
                "LMI_DATABASE_URL": f"sqlite:///{work / 'lmi.sqlite3'}",
                "LMI_APPLIANCE_ROOT": str(root),
                "LMI_LOG_LEVEL": "WARNING",
            }
        )
        manage = [sys.executable, str(BASE_DIR / "manage.py")]
        subprocess.run([*manage, "migrate", "-v", "0"], cwd=BASE_DIR, env=env, check=True)
        os.environ.update(env)
        import django

        django.setup()
        from appliance.demo import init_demo

        init_demo(root, messages=100)
        log = work / "server.log"

        port = free_port()
        service = start([*manage, "smtp_service", "--port", str(port)], env, log)
        wait_for_banner(port, service)
        ours = []
        for level in levels:
            ours.append(measured(service, port, batch, level))
            spool_drain(root / "var" / "spool" / "mailsec" / "outgoing", timeout=120.0)
        code = stop(service)
        db = root / "var" / "lib" / "mailsec" / "msgstore" / "msgstore.db"
        with sqlite3.connect(db) as conn:
            (tracked,) = conn.execute(
                "SELECT count(*) FROM tracking_log WHERE message_id LIKE '<bench.%'"
            ).fetchone()
            (quarantined,) = conn.execute(
                "SELECT count(*) FROM quarantined_message WHERE message_id LIKE '<bench.%'"
            ).fetchone()
        delivered = len(list((root / "var" / "spool" / "mailsec" / "delivered").iterdir()))
        expected = args.messages * len(levels)
        assert code == 0, f"the service exited with {code}:\n{log.read_text()}"
        assert tracked == expected and quarantined + delivered == expected, (
            tracked,
            quarantined,
            delivered,
        )

        port = free_port()
        sink = start([sys.executable, __file__, "--bare-sink", str(port)], env, log)
        wait_for_banner(port, sink)
        bare = [measured(sink, port, batch, level) for level in levels]
        stop(sink)

    print(
        f"{args.messages:,} messages per run ({delivered:,} delivered, {quarantined:,} "
        f"quarantined in all; every one tracked)"
    )
    print(
        f"{'clients':>7} | {'service msg/s':>13} | {'p50 ms':>7} | {'p95 ms':>7} | "
        f"{'p99 ms':>7} | {'CPU ms/msg':>10} | {'bare msg/s':>10} | {'p50 ms':>7} | "
        f"{'p95 ms':>7} | {'p99 ms':>7} | {'CPU ms/msg':>10} | {'bare/service':>12}"
    )
    for mine, theirs in zip(ours, bare, strict=True):
        print(
            f"{mine.concurrency:>7} | {mine.rate:>13,.0f} | {mine.percentile(0.5):>7.2f} | "
            f"{mine.percentile(0.95):>7.2f} | {mine.percentile(0.99):>7.2f} | "
            f"{mine.cpu_ms:>10.2f} | {theirs.rate:>10,.0f} | {theirs.percentile(0.5):>7.2f} | "
            f"{theirs.percentile(0.95):>7.2f} | {theirs.percentile(0.99):>7.2f} | "
            f"{theirs.cpu_ms:>10.2f} | {theirs.rate / mine.rate:>11.1f}x"
        )
    mean = statistics.mean(value for result in ours for value in result.latencies) * 1000
    print(f"mean latency over all service runs: {mean:.2f} ms")
    if args.json:
        emit(
            "smtp_accept",
            messages=args.messages,
            delivered=delivered,
            quarantined=quarantined,
            mean_latency_ms=mean,
            runs=[
                {
                    "clients": mine.concurrency,
                    "service_msg_s": mine.rate,
                    "service_p50_ms": mine.percentile(0.5),
                    "service_p95_ms": mine.percentile(0.95),
                    "service_p99_ms": mine.percentile(0.99),
                    "service_cpu_ms_per_msg": mine.cpu_ms,
                    "bare_msg_s": theirs.rate,
                    "bare_p50_ms": theirs.percentile(0.5),
                    "bare_p95_ms": theirs.percentile(0.95),
                    "bare_p99_ms": theirs.percentile(0.99),
                    "bare_cpu_ms_per_msg": theirs.cpu_ms,
                    "bare_over_service": ratio(theirs.rate, mine.rate),
                }
                for mine, theirs in zip(ours, bare, strict=True)
            ],
            # The service's rate as a share of the bare sink's, by client count (issue 17's key).
            ratio_to_bare={
                str(mine.concurrency): ratio(mine.rate, theirs.rate)
                for mine, theirs in zip(ours, bare, strict=True)
            },
        )


if __name__ == "__main__":
    main()
