"""The outgoing spool and delivery: durable files, the local sink and a loopback next hop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system.paths import layout
from smtp.delivery import DeliveryError, deliver, deliver_batch, parse_next_hop
from smtp.spool import (
    SpoolLocked,
    parse_spool_file,
    render_spool_file,
    spool_clean,
    spool_list,
    spool_lock,
    spool_write,
)
from tests.support.smtp import NextHop, free_port, next_hop  # noqa: F401

MESSAGE = b"Received: from x\r\nSubject: hello\r\n\r\nHi.\r\n"


def set_next_hop(value: str) -> None:
    smtp = read_smtp_settings()
    smtp.next_hop = value
    write_smtp_settings(smtp)


def test_a_spool_file_carries_the_envelope_before_the_message() -> None:
    data = render_spool_file("0A1B2C3D4E", "", ("a@example.com", "B@Example.com"), MESSAGE)

    spooled = parse_spool_file(Path("x.eml"), data)

    assert (spooled.queue_id, spooled.sender) == ("0A1B2C3D4E", "")
    assert spooled.recipients == ("a@example.com", "B@Example.com")
    assert spooled.message == MESSAGE
    assert data.startswith(b"X-LMI-Queue-ID: 0A1B2C3D4E\r\nReturn-Path: <>\r\n")


def test_it_refuses_line_breaks_in_the_envelope() -> None:
    with pytest.raises(ValueError):
        render_spool_file("Q", "a@example.com\r\nRCPT TO:<x@y>", ("b@example.com",), MESSAGE)


def test_spooled_messages_wait_in_arrival_order(demo_appliance: Path) -> None:
    first = spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com",), MESSAGE)
    second = spool_write("BBBBBBBBBB", "a@x.test", ("b@example.com",), MESSAGE)

    assert spool_list() == [first, second]
    assert first.parent == layout().mail_spool_dir
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]


def test_without_a_next_hop_delivery_moves_the_file_into_the_sink(demo_appliance: Path) -> None:
    assert read_smtp_settings().next_hop == ""
    path = spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com",), MESSAGE)

    assert deliver(path) == "local sink"

    assert spool_list() == []
    delivered = layout().mail_sink_dir / path.name
    assert parse_spool_file(delivered, delivered.read_bytes()).message == MESSAGE
    with pytest.raises(FileNotFoundError):
        deliver(path)  # exactly once: a second attempt finds nothing to send


def test_delivery_to_the_next_hop_removes_the_file_after_its_250(
    demo_appliance: Path,
    next_hop: NextHop,  # noqa: F811
) -> None:
    set_next_hop(next_hop.address)
    path = spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com", "c@example.com"), MESSAGE)

    assert deliver(path) == next_hop.address

    (received,) = next_hop.messages
    assert received.sender == "a@x.test"
    assert received.recipients == ["b@example.com", "c@example.com"]
    assert received.content.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
    assert spool_list() == []
    assert not layout().mail_sink_dir.exists() or not any(layout().mail_sink_dir.iterdir())


def test_a_batch_goes_over_one_connection_and_fails_only_where_refused(
    demo_appliance: Path,
    next_hop: NextHop,  # noqa: F811
) -> None:
    set_next_hop(next_hop.address)
    paths = [spool_write(f"Q{n:09d}", "a@x.test", ("b@example.com",), MESSAGE) for n in range(3)]
    paths[1].unlink()  # delivered meanwhile

    results = deliver_batch(paths)

    assert results[0] == results[2] == next_hop.address
    assert isinstance(results[1], FileNotFoundError)
    assert len(next_hop.messages) == 2
    assert spool_list() == []


def test_a_changed_next_hop_applies_to_the_next_delivery_and_the_spool_is_made_on_demand(
    demo_appliance: Path,
    next_hop: NextHop,  # noqa: F811
) -> None:
    """The next hop is read once per change of the settings file, not per batch: a change
    still reaches the very next delivery. The spool directory is made by the first write."""
    import shutil

    shutil.rmtree(layout().mail_spool_dir, ignore_errors=True)
    first = spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com",), MESSAGE)
    assert deliver(first) == "local sink"
    set_next_hop(next_hop.address)
    second = spool_write("BBBBBBBBBB", "a@x.test", ("b@example.com",), MESSAGE)

    assert deliver(second) == next_hop.address
    assert len(next_hop.messages) == 1


def test_an_unreachable_next_hop_leaves_the_message_spooled(demo_appliance: Path) -> None:
    set_next_hop(f"127.0.0.1:{free_port()}")
    path = spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com",), MESSAGE)

    with pytest.raises(DeliveryError):
        deliver(path)

    assert spool_list() == [path]


def test_recipients_the_next_hop_took_are_not_sent_again(demo_appliance: Path) -> None:
    class Picky(NextHop):
        async def handle_RCPT(self, server, session, envelope, address, options):
            if address.startswith("full@"):
                return "452 4.2.2 Mailbox full"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    hop = Picky().start()
    try:
        set_next_hop(hop.address)
        path = spool_write("AAAAAAAAAA", "a@x.test", ("b@example.com", "full@example.com"), MESSAGE)
        with pytest.raises(DeliveryError):
            deliver(path)
        assert parse_spool_file(path, path.read_bytes()).recipients == ("full@example.com",)
        assert hop.messages[0].recipients == ["b@example.com"]
    finally:
        hop.stop()


def test_leftover_temporary_files_are_removed(demo_appliance: Path) -> None:
    spool = layout().mail_spool_dir
    spool.mkdir(parents=True)
    (spool / ".0001-X.eml.abc.tmp").write_bytes(b"half a message")

    assert spool_clean() == 1
    assert list(spool.iterdir()) == []


def test_only_one_process_may_deliver_a_spool_until_it_dies(demo_appliance: Path) -> None:
    layout().mail_spool_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(layout().mail_spool_dir),
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(SpoolLocked):
            spool_lock()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    os.close(spool_lock())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("127.0.0.1:2526", ("127.0.0.1", 2526)),
        ("mail.example.com", ("mail.example.com", 25)),
        ("[::1]:2526", ("::1", 2526)),
    ],
)
def test_next_hop_forms(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_next_hop(text) == expected


def test_a_bad_next_hop_is_a_delivery_error() -> None:
    with pytest.raises(DeliveryError):
        parse_next_hop("127.0.0.1:smtp")
