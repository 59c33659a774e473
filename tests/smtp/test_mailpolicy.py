"""The mail policy file: its format, safe parsing, and the rules the demo binds."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import policy, store
from appliance.config.mailpolicy import (
    MailPolicy,
    PolicyRule,
    mail_policy_path,
    parse_mail_policy,
    render_mail_policy,
)
from appliance.config.store import read_mail_policy, write_mail_policy
from appliance.system.errors import ApplianceNotInitialized, MalformedApplianceFile, UnsafeXMLError


def _objects_by_name() -> dict[str, policy.PolicyObject]:
    return {obj.name: obj for obj in store.list_policy_objects()}


def test_the_demo_binds_the_file_macro_block_list_to_the_sender_block_rule(
    demo_appliance: Path,
) -> None:
    objects = _objects_by_name()
    rules = read_mail_policy()

    (sender_block,) = rules.rules_of("sender-block")
    blocked = objects["Blocked senders"]
    assert sender_block.object_id == blocked.id
    assert blocked.file_path == "/etc/mailsec/lists/blocked_senders.txt"
    assert [rule.object_id for rule in rules.rules_of("sender-allow")] == [
        objects["Allowed domains"].id
    ]
    assert rules.quarantine == {
        "spam": objects["Spam quarantine"].id,
        "virus": objects["Virus quarantine"].id,
        "policy": objects["Policy violations"].id,
    }


def test_the_file_is_one_element_per_line_and_reads_back_the_same(demo_appliance: Path) -> None:
    data = mail_policy_path().read_bytes()
    parsed = parse_mail_policy(data)

    assert render_mail_policy(parsed) == data
    assert all(line.count(b"<") <= 1 for line in data.splitlines())
    spam = parsed.rules_of("spam-keywords")[0]
    assert spam.threshold == 5.0


def test_it_refuses_a_doctype() -> None:
    data = (
        b'<?xml version="1.0"?>\n<!DOCTYPE mailpolicy [<!ENTITY x "y">]>\n'
        b'<mailpolicy version="1.0"><rule type="sender-block" object="&x;"/></mailpolicy>\n'
    )
    with pytest.raises(UnsafeXMLError):
        parse_mail_policy(data)


@pytest.mark.parametrize(
    "body",
    [
        '<rule type="relay-everything" object="a"/>',
        '<rule type="sender-block"/>',
        '<rule type="spam-keywords" object="a" threshold="lots"/>',
        '<rule type="sender-block" object="a" threshold="3"/>',
        '<quarantine verdict="clean" store="a"/>',
        '<quarantine verdict="spam" store="a"/><quarantine verdict="spam" store="b"/>',
        "<forward to='a'/>",
    ],
)
def test_it_refuses_what_it_does_not_understand(body: str) -> None:
    data = f'<mailpolicy version="1.0">{body}</mailpolicy>'.encode()
    with pytest.raises(MalformedApplianceFile):
        parse_mail_policy(data)


def test_reading_without_a_file_says_the_appliance_lacks_it(appliance_root: Path) -> None:
    with pytest.raises(ApplianceNotInitialized):
        read_mail_policy()


def test_writing_refuses_a_rule_naming_a_missing_or_wrong_object(demo_appliance: Path) -> None:
    objects = _objects_by_name()
    before = mail_policy_path().read_bytes()

    with pytest.raises(ValueError, match="no policy object"):
        write_mail_policy(MailPolicy((PolicyRule("sender-block", "no-such-id"),)))
    with pytest.raises(ValueError, match="sizelimit"):
        write_mail_policy(
            MailPolicy((PolicyRule("sender-block", objects["Maximum message size"].id),))
        )
    with pytest.raises(ValueError, match="messagestore"):
        write_mail_policy(MailPolicy(quarantine={"spam": objects["Spam phrases"].id}))
    assert mail_policy_path().read_bytes() == before


def test_writing_a_valid_policy_replaces_the_file(demo_appliance: Path) -> None:
    objects = _objects_by_name()
    new = MailPolicy(
        (PolicyRule("recipient-block", objects["Executive addresses"].id),),
        {"virus": objects["Policy violations"].id},
    )

    write_mail_policy(new)

    assert read_mail_policy() == new
