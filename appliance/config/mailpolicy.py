"""The mail policy (``etc/mailsec/cpe/mailsec_policy1_0.xml``): which policy objects the mail
service applies to each message, and where quarantined messages go.

The file binds policy objects (by id) to rules; the objects themselves, and the ``$(FILE/...)``
lists some of them name, stay in the policy objects file, so editing a list changes what the
rule does without touching this file. The format, one element per line like the other
configuration files::

    <?xml version="1.0" encoding="UTF-8"?>
    <mailpolicy version="1.0">
      <rule type="sender-block" object="OBJECT-ID"/>
      <rule type="sender-allow" object="OBJECT-ID"/>
      <rule type="recipient-block" object="OBJECT-ID"/>
      <rule type="recipient-allow" object="OBJECT-ID"/>
      <rule type="size-limit" object="OBJECT-ID"/>
      <rule type="spam-keywords" object="OBJECT-ID" threshold="5.0"/>
      <rule type="content-keywords" object="OBJECT-ID" senders="OBJECT-ID"/>
      <quarantine verdict="spam" store="OBJECT-ID"/>
      <quarantine verdict="virus" store="OBJECT-ID"/>
      <quarantine verdict="policy" store="OBJECT-ID"/>
    </mailpolicy>

Every element is optional and a rule type may appear more than once (two block lists, say).
``threshold`` is the spam score at which a message counts as spam; ``senders`` restricts a
content rule to mail from the senders on that list (outgoing mail, typically). A verdict
without a ``quarantine`` element goes to the message store of the default name
(:data:`DEFAULT_STORES`).

That is the 2.8.0 format; after the 2.8.1 conversion the policy is the ``<mailPolicy>`` section
of the 2.8.1 configuration file (:mod:`appliance.config.configformat`), and read and write here
use whichever format is on disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from lxml import etree

from appliance.config.policy import PolicyObject
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout
from appliance.system.safexml import parse_xml

_SCHEMA_VERSION = "1.0"

ADDRESS_LIST_TYPES = ("emailaddresslist", "domainlist")
# Rule type -> the policy object types it accepts.
RULE_TYPES: dict[str, tuple[str, ...]] = {
    "sender-block": ADDRESS_LIST_TYPES,
    "sender-allow": ADDRESS_LIST_TYPES,
    "recipient-block": ADDRESS_LIST_TYPES,
    "recipient-allow": ADDRESS_LIST_TYPES,
    "size-limit": ("sizelimit",),
    "spam-keywords": ("keywordlist",),
    "content-keywords": ("keywordlist",),
}
QUARANTINE_VERDICTS = ("spam", "virus", "policy")
# The message store each quarantine verdict uses when the policy binds none (the demo's names).
DEFAULT_STORES = {
    "spam": "Spam quarantine",
    "virus": "Virus quarantine",
    "policy": "Policy violations",
}
DEFAULT_SPAM_THRESHOLD = 5.0


def mail_policy_path(root: Path | None = None) -> Path:
    """Host path of the mail policy file (next to the policy objects it refers to)."""
    return layout(root).cpe_dir / "mailsec_policy1_0.xml"


@dataclass(frozen=True)
class PolicyRule:
    """One rule: a policy object bound to what the mail service does with it."""

    type: str
    object_id: str
    threshold: float | None = None  # spam-keywords only
    senders_id: str | None = None  # content-keywords only: apply to these senders' mail

    def __post_init__(self) -> None:
        if self.type not in RULE_TYPES:
            raise ValueError(f"unknown rule type {self.type!r}")
        if not self.object_id:
            raise ValueError(f"{self.type} rule without an object")
        if self.threshold is not None and (
            self.type != "spam-keywords" or not math.isfinite(self.threshold)
        ):
            raise ValueError("threshold is only a finite number on spam-keywords rules")
        if self.senders_id is not None and self.type != "content-keywords":
            raise ValueError("senders is only allowed on content-keywords rules")


@dataclass(frozen=True)
class MailPolicy:
    """The rules in file order, and the message store object per quarantine verdict."""

    rules: tuple[PolicyRule, ...] = ()
    quarantine: dict[str, str] = field(default_factory=dict)  # verdict -> store object id

    def __post_init__(self) -> None:
        unknown = set(self.quarantine) - set(QUARANTINE_VERDICTS)
        if unknown:
            raise ValueError(f"unknown quarantine verdict(s): {sorted(unknown)}")

    def rules_of(self, rule_type: str) -> list[PolicyRule]:
        return [rule for rule in self.rules if rule.type == rule_type]

    def validate(self, objects: Iterable[PolicyObject]) -> None:
        """Refuse rules that name a missing object or one of the wrong type."""
        by_id = {obj.id: obj for obj in objects}

        def check(obj_id: str, allowed: tuple[str, ...], what: str) -> None:
            obj = by_id.get(obj_id)
            if obj is None:
                raise ValueError(f"{what}: no policy object {obj_id!r}")
            if obj.type not in allowed:
                raise ValueError(
                    f"{what}: policy object {obj.name!r} is a {obj.type}, "
                    f"not one of {', '.join(allowed)}"
                )

        for rule in self.rules:
            check(rule.object_id, RULE_TYPES[rule.type], f"{rule.type} rule")
            if rule.senders_id is not None:
                check(rule.senders_id, ADDRESS_LIST_TYPES, f"{rule.type} rule senders")
        for verdict, store_id in self.quarantine.items():
            check(store_id, ("messagestore",), f"{verdict} quarantine")


def parse_threshold(text: str | None) -> float | None:
    """A spam threshold as written in either configuration format (absent: None)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise MalformedApplianceFile(f"mail policy: threshold {text!r} is not a number") from exc
    if not math.isfinite(value):
        raise MalformedApplianceFile(f"mail policy: threshold {text!r} is not a finite number")
    return value


def parse_rule(element: etree._Element, *, object_attr: str, senders_attr: str) -> PolicyRule:
    """One ``rule`` element of either configuration format as a :class:`PolicyRule`.

    The two formats differ only in what they call the object and senders attributes, so
    the attribute names are parameters and a rule means the same thing in both.
    """
    return PolicyRule(
        type=element.get("type", ""),
        object_id=element.get(object_attr, ""),
        threshold=parse_threshold(element.get("threshold")),
        senders_id=element.get(senders_attr),
    )


def bind_quarantine(quarantine: dict[str, str], verdict: str, store: str) -> None:
    """Record that ``verdict`` goes to ``store``, refusing an unknown verdict or a second store.

    Shared by both configuration formats so they accept and refuse the same bindings.
    """
    if verdict not in QUARANTINE_VERDICTS or not store:
        raise ValueError(f"quarantine verdict={verdict!r} store={store!r}")
    if verdict in quarantine:
        raise ValueError(f"two quarantine stores for {verdict}")
    quarantine[verdict] = store


def parse_mail_policy(data: bytes) -> MailPolicy:
    """Parse the mail policy file's bytes (safely; see :mod:`appliance.system.safexml`)."""
    root = parse_xml(data)
    if root.tag != "mailpolicy":
        raise MalformedApplianceFile(f"mail policy: unexpected root element <{root.tag}>")
    rules = []
    quarantine: dict[str, str] = {}
    for element in root:
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions
        try:
            if element.tag == "rule":
                rules.append(parse_rule(element, object_attr="object", senders_attr="senders"))
            elif element.tag == "quarantine":
                bind_quarantine(quarantine, element.get("verdict", ""), element.get("store", ""))
            else:
                raise ValueError(f"unexpected element <{element.tag}>")
        except ValueError as exc:
            if isinstance(exc, MalformedApplianceFile):
                raise
            raise MalformedApplianceFile(f"mail policy: {exc}") from exc
    return MailPolicy(tuple(rules), quarantine)


def render_mail_policy(policy: MailPolicy) -> bytes:
    """Serialise the policy one element per line: rules in order, then the quarantines."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<mailpolicy version="{_SCHEMA_VERSION}">',
    ]
    for rule in policy.rules:
        attributes = f"type={quoteattr(rule.type)} object={quoteattr(rule.object_id)}"
        if rule.threshold is not None:
            attributes += f' threshold="{rule.threshold:g}"'
        if rule.senders_id is not None:
            attributes += f" senders={quoteattr(rule.senders_id)}"
        lines.append(f"  <rule {attributes}/>")
    for verdict in QUARANTINE_VERDICTS:
        if verdict in policy.quarantine:
            store = quoteattr(policy.quarantine[verdict])
            lines.append(f'  <quarantine verdict="{verdict}" store={store}/>')
    lines.append("</mailpolicy>")
    return ("\n".join(lines) + "\n").encode("utf-8")
