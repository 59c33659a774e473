"""Relay control and envelope syntax in the policy engine, on the demo appliance.

Mail is accepted for the local domains (the "Internal domains" policy object: example.com and
eu.example.com) from any client, and for any other domain only from the SMTP settings' relay
networks. Issue 13: the service used to relay for anyone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.config import store
from appliance.config.configconvert import config_convert, config_format
from appliance.config.policy import PolicyObject
from appliance.config.store import read_smtp_settings, write_smtp_settings
from smtp.engine import (
    REPLY_BAD_RECIPIENT,
    REPLY_BAD_SENDER,
    REPLY_MAIL_SYNTAX,
    REPLY_NULL_RECIPIENT,
    REPLY_RCPT_SYNTAX,
    PolicyCache,
    PolicyError,
    check_path_syntax,
    check_relay,
    compile_policy,
)

SPAMMER_IP = "203.0.113.9"
VICTIM = "victim@gmail.com"
STAFF = "bob.meyer@example.com"


def set_relay_networks(value: str) -> None:
    write_smtp_settings(replace(read_smtp_settings(), relay_networks=value))


def set_internal_domains(value: str) -> None:
    objects = [
        replace(obj, value=value) if obj.name == "Internal domains" else obj
        for obj in store.list_policy_objects()
    ]
    store.write_policy_objects(objects)


def test_mail_for_another_domain_from_an_outside_client_is_relay_access_denied(
    demo_appliance: Path,
) -> None:
    compiled, _ = compile_policy()

    reply = check_relay(compiled, SPAMMER_IP, f"<{VICTIM}>")

    assert reply == "554 5.7.1 <victim@gmail.com>: Relay access denied"


@pytest.mark.parametrize(
    "recipient", [STAFF, "<Bob.Meyer@EXAMPLE.COM>", "anna@eu.example.com", "x@example.com."]
)
def test_any_client_may_send_to_a_local_domain(demo_appliance: Path, recipient: str) -> None:
    compiled, _ = compile_policy()
    assert check_relay(compiled, SPAMMER_IP, recipient) is None


@pytest.mark.parametrize(
    "recipient",
    [
        "postmaster",  # no domain
        "x@sub.example.com",  # a subdomain is not listed
        "x@notexample.com",  # a suffix without the dot
        "x@example.com.evil.test",
        "x@[192.0.2.25]",  # a domain literal, even of the appliance's own address
    ],
)
def test_only_the_listed_domains_themselves_are_local(demo_appliance: Path, recipient: str) -> None:
    compiled, _ = compile_policy()
    assert check_relay(compiled, SPAMMER_IP, recipient) is not None


def test_a_dot_entry_makes_every_subdomain_local_but_not_the_parent(demo_appliance: Path) -> None:
    set_internal_domains(".corp.example\nexample.com\n")
    compiled, _ = compile_policy()

    assert check_relay(compiled, SPAMMER_IP, "x@mail.corp.example") is None
    assert check_relay(compiled, SPAMMER_IP, "x@a.b.corp.example") is None
    assert check_relay(compiled, SPAMMER_IP, "x@corp.example") is not None
    assert check_relay(compiled, SPAMMER_IP, "x@eu.example.com") is not None  # no longer listed
    assert compiled.local_domains.listed() == ("example.com", ".corp.example")


def test_loopback_is_not_a_relay_network_unless_listed(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    assert compiled.relay_networks == ()
    assert check_relay(compiled, "127.0.0.1", VICTIM) is not None
    assert check_relay(compiled, "::1", VICTIM) is not None


def test_a_client_in_a_relay_network_may_send_to_any_domain(demo_appliance: Path) -> None:
    set_relay_networks("198.51.100.7/24 2001:db8::/32")
    compiled, _ = compile_policy()

    assert check_relay(compiled, "198.51.100.200", VICTIM) is None
    assert check_relay(compiled, "::ffff:198.51.100.200", VICTIM) is None  # IPv4-mapped
    assert check_relay(compiled, "2001:db8::25", VICTIM) is None
    assert check_relay(compiled, "198.51.101.1", VICTIM) is not None
    assert check_relay(compiled, "", VICTIM) is not None
    assert check_relay(compiled, "not-an-address", VICTIM) is not None


def test_an_allow_listed_sender_does_not_open_the_relay(demo_appliance: Path) -> None:
    # partner.example.net is on the demo's sender allow list; the check does not even look.
    compiled, _ = compile_policy()
    assert compiled.sender_allow.matches("anna.schmidt@partner.example.net")
    assert check_relay(compiled, SPAMMER_IP, VICTIM) is not None


def test_without_the_internal_domains_object_no_domain_is_local(demo_appliance: Path) -> None:
    objects = [obj for obj in store.list_policy_objects() if obj.name != "Internal domains"]
    # The demo's content rule names the object as its senders: keep it under another name.
    kept = next(obj for obj in store.list_policy_objects() if obj.name == "Internal domains")
    store.write_policy_objects([*objects, PolicyObject(kept.id, "Our domains", kept.type, "")])
    compiled, _ = compile_policy()

    assert not compiled.local_domains
    assert check_relay(compiled, SPAMMER_IP, STAFF) is not None


def test_an_edit_of_the_internal_domains_applies_without_a_restart(demo_appliance: Path) -> None:
    cache = PolicyCache()
    assert check_relay(cache.get(), SPAMMER_IP, "x@new.example") is not None

    set_internal_domains("example.com\nnew.example\n")

    assert check_relay(cache.get(), SPAMMER_IP, "x@new.example") is None


def test_a_relay_networks_edit_applies_without_a_restart(demo_appliance: Path) -> None:
    cache = PolicyCache()
    assert check_relay(cache.get(), "10.1.2.3", VICTIM) is not None

    set_relay_networks("10.0.0.0/8")

    assert check_relay(cache.get(), "10.1.2.3", VICTIM) is None


def test_a_bad_relay_network_on_disk_defers_mail_instead_of_opening_the_relay(
    demo_appliance: Path,
) -> None:
    path = demo_appliance / "etc/mailsec/cpe/mailsec_smtp1_0.xml"
    text = path.read_text()
    assert "<relay_networks></relay_networks>" in text
    path.write_text(text.replace("<relay_networks>", "<relay_networks>10.0.0.0/8 bogus"))

    with pytest.raises(PolicyError, match="bogus"):
        compile_policy()


def test_a_relay_network_for_the_whole_internet_on_disk_defers_mail(demo_appliance: Path) -> None:
    path = demo_appliance / "etc/mailsec/cpe/mailsec_smtp1_0.xml"
    path.write_text(path.read_text().replace("<relay_networks>", "<relay_networks>0.0.0.0/0"))

    with pytest.raises(PolicyError, match="too wide"):
        compile_policy()


def test_the_settings_refuse_a_bad_relay_network_and_write_nothing(demo_appliance: Path) -> None:
    path = demo_appliance / "etc/mailsec/cpe/mailsec_smtp1_0.xml"
    before = path.read_bytes()

    with pytest.raises(ValueError, match=r"10\.0\.0\.256/8"):
        set_relay_networks("192.0.2.0/24 10.0.0.256/8")

    assert path.read_bytes() == before


def test_relay_networks_survive_the_281_conversion(demo_appliance: Path) -> None:
    set_relay_networks("198.51.100.0/24 2001:db8::/32")

    config_convert()

    assert config_format() == "2.8.1"
    assert read_smtp_settings().relay_networks == "198.51.100.0/24 2001:db8::/32"
    compiled, _ = compile_policy()
    assert check_relay(compiled, "198.51.100.1", VICTIM) is None


@pytest.mark.parametrize(
    ("argument", "recipient", "reply"),
    [
        ("spammer@evil.example", False, REPLY_MAIL_SYNTAX),  # no angle brackets
        ("<spammer@evil.example", False, REPLY_MAIL_SYNTAX),
        ("<spam\x00mer@evil.example>", False, REPLY_BAD_SENDER),  # a NUL byte
        ("<spammer@evil.example\x00>", False, REPLY_BAD_SENDER),
        ("victim@gmail.com", True, REPLY_RCPT_SYNTAX),
        ("<vic\x00tim@example.com>", True, REPLY_BAD_RECIPIENT),
        ("<>", True, REPLY_NULL_RECIPIENT),  # the null path is a sender only
        ("< >", True, REPLY_NULL_RECIPIENT),
        ("<>", False, None),  # bounces have the null reverse-path
        ("<anna@partner.example.net> SIZE=100", False, None),
        (" <anna@partner.example.net>", False, None),  # "MAIL FROM: <...>", common and harmless
        ("<bob.meyer@example.com>", True, None),
    ],
)
def test_envelope_paths_need_angle_brackets_and_no_control_characters(
    argument: str, recipient: bool, reply: str | None
) -> None:
    assert check_path_syntax(argument, recipient=recipient) == reply
    if reply is not None:
        assert reply[:3] in ("501", "553")
