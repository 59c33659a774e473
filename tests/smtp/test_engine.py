"""The policy engine on the demo appliance: lists, allow over block, viruses, size and spam."""

from __future__ import annotations

import base64
import os
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from appliance.config import policy, store
from appliance.config.mailpolicy import MailPolicy, PolicyRule
from appliance.config.policy import PolicyObject
from appliance.config.store import (
    read_mail_policy,
    read_smtp_settings,
    write_mail_policy,
    write_smtp_settings,
)
from appliance.system.paths import layout
from smtp.engine import (
    EICAR,
    PolicyCache,
    PolicyError,
    check_recipient,
    compile_policy,
    evaluate,
)

PARTNER = "anna.schmidt@partner.example.net"  # on the demo's "Allowed domains" list
OUTSIDER = "someone@elsewhere.test"  # on no list
STAFF = "bob.meyer@example.com"


def message(
    subject: str = "Re: quarterly review",
    body: str = "Thanks, see you on Friday.",
    *,
    sender: str = OUTSIDER,
    to: str = STAFF,
    date: bool = True,
    message_id: bool = True,
    attachment: bytes | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    if date:
        msg["Date"] = "Tue, 01 Oct 2013 12:00:00 +0000"
    if message_id:
        msg["Message-ID"] = "<test.1@elsewhere.test>"
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename="invoice.zip"
        )
    return msg.as_bytes(policy=SMTP)


def objects_by_name() -> dict[str, PolicyObject]:
    return {obj.name: obj for obj in store.list_policy_objects()}


def add_rule(rule_type: str, name: str, obj_type: str, value: str) -> None:
    """Add a policy object and bind it with one more rule of the demo's mail policy."""
    objects = store.list_policy_objects()
    new = PolicyObject(f"test-{name}", name, obj_type, value)
    store.write_policy_objects([*objects, new])
    current = read_mail_policy()
    write_mail_policy(
        MailPolicy((*current.rules, PolicyRule(rule_type, new.id)), current.quarantine)
    )


def blocked_senders_file() -> Path:
    return policy.object_file(objects_by_name()["Blocked senders"])


# --- Lists --------------------------------------------------------------------------------------


def test_a_sender_on_the_file_block_list_is_refused_with_550(demo_appliance: Path) -> None:
    compiled, list_files = compile_policy()

    reply = check_recipient(compiled, "offers@promo-deals.test", STAFF)

    assert reply is not None and reply.startswith("550 5.7.1 <offers@promo-deals.test>")
    assert blocked_senders_file() in list_files


def test_list_entries_match_case_insensitively(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    assert check_recipient(compiled, "<Offers@PROMO-Deals.test>", STAFF) is not None
    assert check_recipient(compiled, "offers2@promo-deals.test", STAFF) is None


def test_an_edit_of_the_list_file_applies_without_a_restart(demo_appliance: Path) -> None:
    cache = PolicyCache()
    assert check_recipient(cache.get(), "new.spammer@elsewhere.test", STAFF) is None

    path = blocked_senders_file()
    path.write_text(path.read_text() + "New.Spammer@elsewhere.test\n")
    # Same second, same size class: the cache must notice by more than the mtime's seconds.
    os.utime(path, ns=(time.time_ns(), time.time_ns()))

    assert check_recipient(cache.get(), "new.spammer@elsewhere.test", STAFF) is not None


def test_the_cache_reuses_the_policy_while_nothing_changed(demo_appliance: Path) -> None:
    cache = PolicyCache()
    assert cache.get() is cache.get()


def test_domain_entries_match_every_address_of_the_domain(demo_appliance: Path) -> None:
    add_rule("recipient-block", "Closed mailboxes", "domainlist", "@closed.example\nold.example\n")
    compiled, _ = compile_policy()

    assert check_recipient(compiled, OUTSIDER, "Anyone@Closed.Example") is not None
    assert check_recipient(compiled, OUTSIDER, "someone@old.example") is not None
    assert check_recipient(compiled, OUTSIDER, "someone@sub.old.example") is None
    reply = check_recipient(compiled, OUTSIDER, "x@closed.example")
    assert reply is not None and "Recipient address rejected" in reply


def test_allow_wins_over_block(demo_appliance: Path) -> None:
    blocked_partner = "billing@partner.example.net"
    path = blocked_senders_file()
    path.write_text(path.read_text() + blocked_partner + "\n")
    add_rule("recipient-allow", "Postmaster", "emailaddresslist", "postmaster@example.com\n")
    compiled, _ = compile_policy()

    # The partner's domain is on the sender allow list, the address on the block list.
    assert check_recipient(compiled, blocked_partner, STAFF) is None
    # A blocked sender still reaches an allowed recipient.
    assert check_recipient(compiled, "offers@promo-deals.test", "postmaster@example.com") is None
    assert check_recipient(compiled, "offers@promo-deals.test", STAFF) is not None


def test_an_allowed_sender_skips_spam_scoring(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    spammy = message("You have won a prize", "Limited offer, no prescription", date=False)

    assert evaluate(compiled, OUTSIDER, [STAFF], spammy).verdict == "spam"
    allowed = evaluate(compiled, PARTNER, [STAFF], spammy)
    assert (allowed.verdict, allowed.action) == ("clean", "delivered")


def test_a_missing_list_file_makes_the_policy_unusable(demo_appliance: Path) -> None:
    blocked_senders_file().unlink()
    with pytest.raises(PolicyError):
        PolicyCache().get()


# --- Viruses ------------------------------------------------------------------------------------


def test_the_eicar_string_in_plain_text_is_a_virus_for_the_virus_store(
    demo_appliance: Path,
) -> None:
    compiled, _ = compile_policy()

    verdict = evaluate(compiled, PARTNER, [STAFF], message(body="see " + EICAR.decode() + " here"))

    assert (verdict.verdict, verdict.action, verdict.store) == (
        "virus", "quarantined", "Virus quarantine"
    )  # fmt: skip


def test_the_eicar_string_in_a_base64_attachment_is_found(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    raw = message("Invoice 4711 overdue", "Please open the attachment.", attachment=EICAR)
    assert EICAR not in raw  # only the decoded part holds it
    assert base64.b64encode(EICAR)[:20] in raw

    verdict = evaluate(compiled, OUTSIDER, [STAFF], raw)

    assert (verdict.verdict, verdict.store) == ("virus", "Virus quarantine")
    assert verdict.subject == "Invoice 4711 overdue"


def test_the_eicar_string_in_a_quoted_printable_part_is_found(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    body = EICAR.decode().replace("=", "=3D").replace("P", "=50")
    raw = (
        "From: a@elsewhere.test\r\nTo: b@example.com\r\nSubject: qp\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        f"{body}\r\n"
    ).encode()
    assert EICAR not in raw

    assert evaluate(compiled, OUTSIDER, [STAFF], raw).verdict == "virus"


def test_an_allowed_sender_is_still_checked_for_viruses(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    verdict = evaluate(compiled, PARTNER, [STAFF], message(attachment=EICAR))
    assert verdict.verdict == "virus"


# --- Size ---------------------------------------------------------------------------------------


def test_a_message_over_the_sizelimit_object_is_rejected_with_552(demo_appliance: Path) -> None:
    objects = store.list_policy_objects()
    for obj in objects:
        if obj.name == "Maximum message size":
            obj.value = "2000"
    store.write_policy_objects(objects)
    compiled, _ = compile_policy()
    assert compiled.max_message_size == 2000

    verdict = evaluate(compiled, PARTNER, [STAFF], message(body="x" * 3000))

    assert (verdict.verdict, verdict.action) == ("policy", "rejected")
    assert verdict.reply is not None and verdict.reply.startswith("552 5.3.4")
    assert evaluate(compiled, PARTNER, [STAFF], message(body="x" * 500)).action == "delivered"


def test_the_smtp_settings_limit_applies_when_it_is_lower(demo_appliance: Path) -> None:
    smtp = read_smtp_settings()
    smtp.max_message_size = 1234
    write_smtp_settings(smtp)

    assert compile_policy()[0].max_message_size == 1234


# --- Spam ---------------------------------------------------------------------------------------


def test_keywords_in_subject_and_body_reach_the_threshold(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()

    verdict = evaluate(
        compiled, OUTSIDER, [STAFF], message("YOU HAVE WON", "A limited offer for you.")
    )

    assert (verdict.verdict, verdict.action, verdict.store) == (
        "spam", "quarantined", "Spam quarantine"
    )  # fmt: skip
    assert verdict.score is not None and verdict.score >= compiled.spam_threshold == 5.0
    assert any("keyword in subject: you have won" in reason for reason in verdict.reasons)


def test_one_keyword_alone_stays_below_the_threshold(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()

    verdict = evaluate(compiled, OUTSIDER, [STAFF], message("Re: limited offer on desks"))

    assert (verdict.verdict, verdict.action, verdict.score) == ("clean", "delivered", 3.0)


def test_missing_headers_and_many_recipients_add_up_to_spam(demo_appliance: Path) -> None:
    compiled, _ = compile_policy()
    recipients = [f"user{n}@example.com" for n in range(12)]
    raw = message("Hello", "Hi.", date=False, message_id=False)

    verdict = evaluate(compiled, OUTSIDER, recipients, raw)

    assert verdict.verdict == "spam"
    assert verdict.score == 1.5 + 1.5 + 2.0
    assert evaluate(compiled, OUTSIDER, recipients[:1], raw).verdict == "clean"


def test_confidential_words_from_internal_senders_go_to_the_policy_store(
    demo_appliance: Path,
) -> None:
    compiled, _ = compile_policy()
    raw = message("Q3 results", "The board minutes are attached.", sender=STAFF)

    outgoing = evaluate(compiled, STAFF, ["cfo@lawfirm.example"], raw)
    incoming = evaluate(compiled, OUTSIDER, [STAFF], raw)

    assert (outgoing.verdict, outgoing.action, outgoing.store) == (
        "policy", "quarantined", "Policy violations"
    )  # fmt: skip
    assert incoming.verdict == "clean"


def test_without_a_mail_policy_nothing_is_blocked_and_stores_keep_their_names(
    demo_appliance: Path,
) -> None:
    (layout().cpe_dir / "mailsec_policy1_0.xml").unlink()
    compiled, _ = compile_policy()

    assert check_recipient(compiled, "offers@promo-deals.test", STAFF) is None
    assert compiled.store_for("spam") == "Spam quarantine"
    assert evaluate(compiled, OUTSIDER, [STAFF], message(attachment=EICAR)).verdict == "virus"
