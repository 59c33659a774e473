"""The mail policy engine: what happens to one message (deliver, quarantine or reject) and why.

The appliance's configuration (the mail policy file, the policy objects, the ``$(FILE/...)``
lists they name and the SMTP settings) is compiled into a :class:`CompiledPolicy`, which
:class:`PolicyCache` keeps until one of those files changes on disk, so an administrator's edit
applies to the next message without a restart. The checks themselves are pure functions of the
compiled policy and the message:

* at ``MAIL FROM`` and ``RCPT TO`` (:func:`check_path_syntax`): a path without angle brackets
  is refused with 501, a control character (NUL included) in it with 553, and so is the null
  path ``<>`` as a recipient (it is only valid as a reverse-path, RFC 5321 4.1.1.3);
* at ``RCPT TO`` (:func:`check_relay`): a recipient outside the local domains is refused with
  554 unless the client is in one of the SMTP settings' relay networks; no allow list opens
  the relay, since a sender address is whatever the client claims;
* at ``RCPT TO`` (:func:`check_recipient`): a blocked sender or recipient is refused with 550,
  unless an allow list covers the sender or that recipient (allow wins over block);
* at the end of ``DATA`` (:func:`evaluate`), in this order: the maximum message size (552), a
  virus (the EICAR test string, also inside base64 or quoted-printable MIME parts) to the virus
  store, a content keyword to the policy store, a spam score at or above the threshold to the
  spam store (not scored when an allow list covers the sender or every recipient), else
  delivery.
"""

from __future__ import annotations

import email
import email.policy
import ipaddress
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses
from pathlib import Path

from appliance.config.configconvert import config_path
from appliance.config.mailpolicy import (
    DEFAULT_SPAM_THRESHOLD,
    DEFAULT_STORES,
    MailPolicy,
    mail_policy_path,
)
from appliance.config.policy import PolicyObject, object_file, read_object_lines
from appliance.config.store import list_policy_objects, read_mail_policy, read_smtp_settings
from appliance.mail.eicar import EICAR, EICAR_NAME
from appliance.system.errors import ApplianceError, ApplianceNotInitialized
from appliance.system.paths import appliance_root, layout

# What each spam indicator adds to a message's score; a keyword counts once per place.
SPAM_WEIGHTS = {
    "keyword in subject": 3.0,
    "keyword in body": 2.0,
    "no Date header": 1.5,
    "no Message-ID header": 1.5,
    "many recipients": 2.0,
    "subject in capitals": 1.0,
}
MANY_RECIPIENTS = 10
# Body text scanned for keywords; a long message's tail does not change the verdict.
MAX_SCANNED_TEXT = 1024 * 1024
_TRANSFER_ENCODED = frozenset({"base64", "quoted-printable", "x-uuencode", "uuencode", "x-uue"})
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")

REPLY_SENDER_BLOCKED = "550 5.7.1 <{address}>: Sender address rejected: blocked by policy"
REPLY_RECIPIENT_BLOCKED = "550 5.7.1 <{address}>: Recipient address rejected: blocked by policy"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size ({limit} bytes)"
REPLY_RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
REPLY_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
REPLY_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
REPLY_BAD_SENDER = "553 5.1.7 Bad sender address syntax"
REPLY_BAD_RECIPIENT = "553 5.1.3 Bad recipient address syntax"
REPLY_NULL_RECIPIENT = "553 5.1.3 The null path <> is not a valid recipient"

# The policy object whose domains the appliance accepts mail for from any client: the demo's
# and the shipped configuration's name for the company's own domains (also the senders of the
# confidential-keywords rule). A domain listed there matches itself only; ".example.com" matches
# every subdomain of example.com (not example.com itself), as Postfix's relay_domains does
# without parent_domain_matches_subdomains.
LOCAL_DOMAINS_OBJECT = "Internal domains"
# Control characters: a NUL or a line break in an address would end up in the spool's envelope,
# the logs and the next hop's session.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ApplianceError):
    """The policy cannot be applied (a file is missing, damaged or dangling): mail gets 451."""


def envelope_address(address: str) -> str:
    """An envelope address as given, trimmed, with the null sender ``<>`` as the empty string."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def normalize_address(address: str) -> str:
    """An envelope address for matching against lists: see :func:`envelope_address`, lower-case."""
    return envelope_address(address).lower()


@dataclass(frozen=True)
class AddressList:
    """Exact addresses and whole domains; entries ``@domain`` or ``domain`` are domains."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> AddressList:
        addresses, domains = set(), set()
        for entry in entries:
            entry = entry.strip().lower()
            if entry.startswith("@"):
                domains.add(entry[1:])
            elif "@" in entry:
                addresses.add(entry)
            elif entry:
                domains.add(entry)
        return cls(frozenset(addresses), frozenset(domains))

    def __or__(self, other: AddressList) -> AddressList:
        return AddressList(self.addresses | other.addresses, self.domains | other.domains)

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains)

    def matches(self, address: str) -> bool:
        address = normalize_address(address)
        if not address:
            return False
        return address in self.addresses or address.rpartition("@")[2] in self.domains


@dataclass(frozen=True)
class LocalDomains:
    """The domains mail is accepted for from any client: exact names, and ``.parent`` entries
    that match the parent's subdomains only."""

    names: frozenset[str] = frozenset()
    parents: tuple[str, ...] = ()  # each with its leading dot

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> LocalDomains:
        names, parents = set(), set()
        for entry in entries:
            domain = entry.strip().lower().lstrip("@").rstrip(".")
            if domain.startswith("."):
                if len(domain) > 1:
                    parents.add(domain)
            elif domain and "@" not in domain:
                names.add(domain)
        return cls(frozenset(names), tuple(sorted(parents)))

    def __bool__(self) -> bool:
        return bool(self.names or self.parents)

    def matches(self, address: str) -> bool:
        """True when the address's domain is local (an address without a domain never is)."""
        local, at, domain = normalize_address(address).rpartition("@")
        domain = domain.rstrip(".")
        if not (local and at and domain):
            return False
        return domain in self.names or domain.endswith(self.parents)

    def listed(self) -> tuple[str, ...]:
        """As an administrator would list them: names, then ``.parent`` entries."""
        return (*sorted(self.names), *self.parents)


@dataclass(frozen=True)
class ContentRule:
    """Keywords that send a message to the policy store, optionally only for some senders."""

    keywords: tuple[str, ...]
    senders: AddressList | None = None


@dataclass(frozen=True)
class CompiledPolicy:
    """Everything the checks need, read from disk once per change of the files."""

    sender_block: AddressList = AddressList()
    sender_allow: AddressList = AddressList()
    recipient_block: AddressList = AddressList()
    recipient_allow: AddressList = AddressList()
    max_message_size: int = 20 * 1024 * 1024
    spam_keywords: tuple[str, ...] = ()
    spam_threshold: float = DEFAULT_SPAM_THRESHOLD
    content_rules: tuple[ContentRule, ...] = ()
    stores: tuple[tuple[str, str], ...] = tuple(DEFAULT_STORES.items())  # verdict, store name
    local_domains: LocalDomains = LocalDomains()
    relay_networks: tuple[IPNetwork, ...] = ()

    def store_for(self, verdict: str) -> str:
        return dict(self.stores)[verdict]


@dataclass(frozen=True)
class Verdict:
    """The outcome for one message: what to do, where it goes, why, and what the logs show."""

    verdict: str  # clean, spam, virus, policy (as in the tracking log)
    action: str  # delivered, quarantined, rejected
    reply: str | None = None  # the response line of a rejection
    store: str | None = None  # the message store of a quarantine
    reasons: tuple[str, ...] = ()
    score: float | None = None
    subject: str = ""
    message_id: str = ""


# --- Compiling the policy --------------------------------------------------------------------


def _size(obj: PolicyObject) -> int:
    try:
        size = int(obj.value.strip())
    except ValueError as exc:
        raise PolicyError(f"size limit {obj.name!r} is not a number of bytes") from exc
    if size <= 0:
        raise PolicyError(f"size limit {obj.name!r} must be positive")
    return size


def compile_policy(root: Path | None = None) -> tuple[CompiledPolicy, tuple[Path, ...]]:
    """Read the configuration and return the compiled policy and the list files it read.

    Without a mail policy file nothing is blocked, allowed or keyword-scored (the header
    indicators still count) and quarantines go to the stores of the default names. Without a
    policy object named :data:`LOCAL_DOMAINS_OBJECT` there are no local domains, and only
    clients in the relay networks get mail accepted (closed, not open, when it is missing).
    """
    base = appliance_root(root)
    try:
        smtp = read_smtp_settings(base)
        try:
            rules = read_mail_policy(base)
        except ApplianceNotInitialized:
            rules = MailPolicy()
        try:
            objects = list_policy_objects(base)
        except ApplianceNotInitialized:
            objects = []
        rules.validate(objects)
        relay_networks = smtp.relay_network_list()
    except (ApplianceError, ValueError, OSError) as exc:
        raise PolicyError(f"the mail policy cannot be read: {exc}") from exc

    by_id = {obj.id: obj for obj in objects}
    list_files: list[Path] = []
    local_domain_ids = [
        obj.id for obj in objects if obj.name == LOCAL_DOMAINS_OBJECT and obj.type == "domainlist"
    ]

    def entries(obj_id: str) -> list[str]:
        obj = by_id[obj_id]
        try:
            if obj.file_path is not None:
                list_files.append(object_file(obj, base))
            return read_object_lines(obj, base)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PolicyError(f"policy object {obj.name!r} cannot be read: {exc}") from exc

    def address_list(rule_type: str) -> AddressList:
        merged = AddressList()
        for rule in rules.rules_of(rule_type):
            merged |= AddressList.from_entries(entries(rule.object_id))
        return merged

    spam_rules = rules.rules_of("spam-keywords")
    thresholds = [rule.threshold for rule in spam_rules if rule.threshold is not None]
    stores = dict(DEFAULT_STORES)
    for verdict, store_id in rules.quarantine.items():
        stores[verdict] = by_id[store_id].value.strip()
    compiled = CompiledPolicy(
        sender_block=address_list("sender-block"),
        sender_allow=address_list("sender-allow"),
        recipient_block=address_list("recipient-block"),
        recipient_allow=address_list("recipient-allow"),
        max_message_size=min(
            [smtp.max_message_size]
            + [_size(by_id[rule.object_id]) for rule in rules.rules_of("size-limit")]
        ),
        spam_keywords=tuple(
            dict.fromkeys(
                keyword.lower() for rule in spam_rules for keyword in entries(rule.object_id)
            )
        ),
        spam_threshold=min(thresholds) if thresholds else DEFAULT_SPAM_THRESHOLD,
        content_rules=tuple(
            ContentRule(
                keywords=tuple(keyword.lower() for keyword in entries(rule.object_id)),
                senders=(
                    AddressList.from_entries(entries(rule.senders_id))
                    if rule.senders_id is not None
                    else None
                ),
            )
            for rule in rules.rules_of("content-keywords")
        ),
        stores=tuple(stores.items()),
        local_domains=LocalDomains.from_entries(
            entry for obj_id in local_domain_ids for entry in entries(obj_id)
        ),
        relay_networks=relay_networks,
    )
    return compiled, tuple(list_files)


def _signature(paths: Sequence[Path | str]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when any of the files is edited, replaced or removed."""
    signature: list[tuple[int, int, int] | None] = []
    append = signature.append
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            append(None)
        else:
            append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(signature)


class PolicyCache:
    """The compiled policy, rebuilt when a file it was compiled from changes.

    A few ``stat`` calls per message instead of parsing XML and reading lists: the files are
    the configuration files of both formats (2.8.0 and 2.8.1, see
    :mod:`appliance.config.configformat`) and every ``$(FILE/...)`` list the rules use.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: Path | None = None
        self._watched: tuple[str, ...] = ()  # the files of the compiled policy, as strings
        self._signature: tuple[tuple[int, int, int] | None, ...] = ()
        self._policy: CompiledPolicy | None = None
        self._list_files: tuple[Path, ...] = ()
        self._paths: dict[Path, tuple[Path, ...]] = {}

    def _config_files(self, base: Path) -> tuple[Path, ...]:
        # Built once per root: pathlib joins cost more than the stat calls they feed.
        files = self._paths.get(base)
        if files is None:
            # Both formats' files: a conversion or a rollback between messages shows up as a
            # change (a file appearing or vanishing), whichever direction it goes.
            the_layout = layout(base)
            files = (
                mail_policy_path(base),
                the_layout.policy_objects_xml,
                the_layout.smtp_xml,
                config_path(base),
            )
            self._paths[base] = files
        return files

    def get(self, root: Path | None = None) -> CompiledPolicy:
        base = appliance_root(root)
        with self._lock:
            # The hot path, once per message: one stat per file (as strings, prepared at the
            # last compile) and a tuple comparison, nothing parsed or joined.
            if (
                self._policy is not None
                and self._base == base
                and self._signature == _signature(self._watched)
            ):
                return self._policy
            # Take the signature before reading: an edit during the read then shows up as a
            # change next time rather than being missed.
            config_files = self._config_files(base)
            before = _signature(config_files)
            policy, list_files = compile_policy(base)
            self._policy, self._list_files = policy, list_files
            self._base = base
            self._watched = tuple(str(path) for path in config_files + list_files)
            self._signature = (*before, *_signature(list_files))
            return policy


# --- Checking messages -----------------------------------------------------------------------


def is_allowed(policy: CompiledPolicy, sender: str, recipients: Sequence[str]) -> bool:
    """True when an allow list covers the sender, or every recipient."""
    if policy.sender_allow.matches(sender):
        return True
    return bool(recipients) and all(policy.recipient_allow.matches(r) for r in recipients)


def check_path_syntax(argument: str, *, recipient: bool) -> str | None:
    """The 501 or 553 refusing a ``MAIL FROM:`` or ``RCPT TO:`` argument as the client sent it
    (after the colon), or None to let the SMTP parser go on.

    aiosmtpd parses leniently: it takes an address without angle brackets, keeps a NUL byte in
    it, and accepts ``<>`` as a recipient; RFC 5321 (4.1.2) requires the brackets and allows the
    null path only as the reverse-path.
    """
    argument = argument.lstrip(" ")
    if _CONTROL.search(argument):
        return REPLY_BAD_RECIPIENT if recipient else REPLY_BAD_SENDER
    if not argument.startswith("<") or ">" not in argument:
        return REPLY_RCPT_SYNTAX if recipient else REPLY_MAIL_SYNTAX
    if recipient and argument[1:].lstrip().startswith(">"):
        return REPLY_NULL_RECIPIENT
    return None


def client_address(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address, an IPv4-mapped IPv6 one as IPv4; None when it is not an address."""
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def may_relay(policy: CompiledPolicy, client_ip: str) -> bool:
    """True when the client is in one of the relay networks (loopback is not implicitly)."""
    address = client_address(client_ip)
    return address is not None and any(address in network for network in policy.relay_networks)


def check_relay(policy: CompiledPolicy, client_ip: str, recipient: str) -> str | None:
    """The 554 refusing a recipient this appliance must not relay to, or None to go on.

    Any client may send to a local domain; a client in a relay network may send anywhere.
    """
    if policy.local_domains.matches(recipient) or may_relay(policy, client_ip):
        return None
    return REPLY_RELAY_DENIED.format(address=normalize_address(recipient))


def check_recipient(policy: CompiledPolicy, sender: str, recipient: str) -> str | None:
    """The 550 reply refusing this recipient of this sender, or None to accept it."""
    if policy.sender_allow.matches(sender) or policy.recipient_allow.matches(recipient):
        return None
    if policy.sender_block.matches(sender):
        return REPLY_SENDER_BLOCKED.format(address=normalize_address(sender))
    if policy.recipient_block.matches(recipient):
        return REPLY_RECIPIENT_BLOCKED.format(address=normalize_address(recipient))
    return None


def rejection_reason(reply: str) -> str:
    """Why the mail policy rejected, in a few words, from the reply it answered: the key by
    which the Mail Security events sum rejections up."""
    if "Sender address rejected" in reply:
        return "sender on a block list"
    if "Recipient address rejected" in reply:
        return "recipient on a block list"
    if reply.startswith("552"):
        return "over the size limit"
    return reply[:3] or "rejected"


def parse_message(content: bytes) -> Message:
    """Parse leniently: mail from the internet is often malformed and must still be judged."""
    return email.message_from_bytes(content, policy=email.policy.compat32)


def header_text(message: Message, name: str, limit: int = 998) -> str:
    """A header decoded from RFC 2047 encoded words, on one line; "" when absent."""
    value = message.get(name)
    if value is None:
        return ""
    try:
        text = str(make_header(decode_header(str(value))))
    except (ValueError, LookupError, UnicodeError):
        text = str(value)
    return _SPACE.sub(" ", text).strip()[:limit]


def _decoded_parts(message: Message) -> Iterable[tuple[Message, bytes]]:
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            yield part, payload


def find_virus(content: bytes, message: Message) -> str | None:
    """The name of the virus found in the raw message or any decoded MIME part, or None."""
    if EICAR in content:
        return EICAR_NAME
    for part, payload in _decoded_parts(message):
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if encoding in _TRANSFER_ENCODED and EICAR in payload:
            return EICAR_NAME
    return None


def body_text(message: Message) -> str:
    """The text of the text/* parts (tags of HTML dropped), up to ``MAX_SCANNED_TEXT``."""
    texts: list[str] = []
    length = 0
    for part, payload in _decoded_parts(message):
        if part.get_content_maintype() != "text":
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:
            text = payload.decode("latin-1")
        if part.get_content_subtype() == "html":
            text = _TAG.sub(" ", text)
        texts.append(text)
        length += len(text)
        if length >= MAX_SCANNED_TEXT:
            break
    return "\n".join(texts)[:MAX_SCANNED_TEXT]


def spam_score(
    policy: CompiledPolicy, message: Message, subject: str, text: str, recipients: Sequence[str]
) -> tuple[float, tuple[str, ...]]:
    """A simple additive score and the indicators that made it up."""
    score = 0.0
    reasons: list[str] = []

    def add(indicator: str, detail: str = "") -> None:
        nonlocal score
        weight = SPAM_WEIGHTS[indicator]
        score += weight
        reasons.append(f"{indicator}{': ' + detail if detail else ''} (+{weight:g})")

    lowered_subject, lowered_text = subject.lower(), text.lower()
    for keyword in policy.spam_keywords:
        if keyword in lowered_subject:
            add("keyword in subject", keyword)
        if keyword in lowered_text:
            add("keyword in body", keyword)
    if message.get("Date") is None:
        add("no Date header")
    if message.get("Message-ID") is None:
        add("no Message-ID header")
    header_recipients = getaddresses(
        [str(value) for name in ("To", "Cc") for value in message.get_all(name, [])]
    )
    if max(len(recipients), len(header_recipients)) >= MANY_RECIPIENTS:
        add("many recipients", str(max(len(recipients), len(header_recipients))))
    letters = [char for char in subject if char.isalpha()]
    if len(letters) >= 8 and all(char.isupper() for char in letters):
        add("subject in capitals")
    return score, tuple(reasons)


def _content_keyword(policy: CompiledPolicy, sender: str, subject: str, text: str) -> str | None:
    haystack = f"{subject}\n{text}".lower()
    for rule in policy.content_rules:
        if rule.senders is not None and not rule.senders.matches(sender):
            continue
        for keyword in rule.keywords:
            if keyword in haystack:
                return keyword
    return None


def evaluate(
    policy: CompiledPolicy, sender: str, recipients: Sequence[str], content: bytes
) -> Verdict:
    """Judge a whole message (``content`` as the client sent it) for its accepted recipients."""
    message = parse_message(content)
    subject = header_text(message, "Subject")
    message_id = header_text(message, "Message-ID")
    about = {"subject": subject, "message_id": message_id}

    if len(content) > policy.max_message_size:
        return Verdict(
            "policy",
            "rejected",
            reply=REPLY_TOO_BIG.format(limit=policy.max_message_size),
            reasons=(f"size {len(content)} > {policy.max_message_size}",),
            **about,
        )
    virus = find_virus(content, message)
    if virus is not None:
        return Verdict(
            "virus", "quarantined", store=policy.store_for("virus"), reasons=(virus,), **about
        )
    text = body_text(message)
    keyword = _content_keyword(policy, sender, subject, text)
    if keyword is not None:
        return Verdict(
            "policy",
            "quarantined",
            store=policy.store_for("policy"),
            reasons=(f"content keyword: {keyword}",),
            **about,
        )
    if is_allowed(policy, sender, recipients):
        return Verdict("clean", "delivered", reasons=("allow list",), **about)
    score, reasons = spam_score(policy, message, subject, text, recipients)
    if score >= policy.spam_threshold:
        return Verdict(
            "spam",
            "quarantined",
            store=policy.store_for("spam"),
            reasons=reasons,
            score=score,
            **about,
        )
    return Verdict("clean", "delivered", reasons=reasons, score=score, **about)
