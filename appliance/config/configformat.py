"""The 2.8.1 configuration format: one document for the whole mail-security configuration.

Firmware 2.8.0 keeps the mail-security configuration in three XML files under
``etc/mailsec/cpe/``: the policy objects (values base64-encoded, ``$(FILE/...)`` macros inside
the base64), the SMTP settings and the mail policy. Firmware 2.8.1 keeps it in ONE file,
``etc/mailsec/cpe/mailsec_config2_0.xml``::

    <?xml version='1.0' encoding='UTF-8'?>
    <mailsecConfig formatVersion="2.8.1" convertedFrom="2.8.0">
      <policyObjects>
        <object id="..." type="keywordlist">
          <name>Spam keywords</name>
          <value>viagra
    lottery</value>
        </object>
        <object id="..." type="emailaddresslist">
          <name>Blocked senders</name>
          <fileRef path="/etc/mailsec/lists/blocked_senders.txt" sha256="..."/>
        </object>
        <object id="..." type="keywordlist">
          <name>Odd bytes</name>
          <value encoding="base64">AQID</value>
        </object>
      </policyObjects>
      <mailPolicy>
        <rules>
          <rule type="spam-keywords" objectRef="..." threshold="5.0"/>
          <rule type="content-keywords" objectRef="..." sendersRef="..."/>
        </rules>
        <quarantine>
          <store verdict="spam" objectRef="..."/>
        </quarantine>
      </mailPolicy>
      <smtp>
        <listenPort>25</listenPort>
        <nextHop></nextHop>
        <maxMessageSize>20971520</maxMessageSize>
        <smtpLogRetentionDays>90</smtpLogRetentionDays>
        <trackingLogRetentionDays>90</trackingLogRetentionDays>
        <relayNetworks></relayNetworks>
      </smtp>
    </mailsecConfig>

Values are plain text (base64 only for the rare value XML 1.0 cannot carry, so nothing is
lost); a value that is exactly a ``$(FILE/...)`` macro becomes a ``<fileRef>`` carrying the
sha256 of the list file when the configuration was last saved, which is how the conversion proves
the files were carried over (the original 2.8.1 upgrade lost them). A section is absent exactly
when the corresponding 2.8.0 file was absent, so "no mail policy" keeps meaning what it meant.

Reading and writing the file on the appliance, and converting to it, is
:mod:`appliance.config.configconvert`'s.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, fields

from lxml import etree

from appliance.config.mailpolicy import (
    QUARANTINE_VERDICTS,
    MailPolicy,
    PolicyRule,
    bind_quarantine,
    parse_mail_policy,
    parse_rule,
)
from appliance.config.policy import (
    FILE_MACRO,
    PolicyObject,
    file_macro,
    parse_policy_objects,
    render_policy_objects,
)
from appliance.config.smtp import SmtpSettings, parse_smtp_settings
from appliance.system.errors import MalformedApplianceFile
from appliance.system.safexml import parse_xml

CONFIG_FORMATS = ("2.8.0", "2.8.1")
CURRENT_FORMAT = "2.8.1"
LEGACY_FORMAT = "2.8.0"
CPE_DIR = "etc/mailsec/cpe"
CONFIG_FILE = f"{CPE_DIR}/mailsec_config2_0.xml"
LEGACY_POLICY_OBJECTS = f"{CPE_DIR}/mailsec_policyobjects1_1.xml"
LEGACY_SMTP = f"{CPE_DIR}/mailsec_smtp1_0.xml"
LEGACY_MAIL_POLICY = f"{CPE_DIR}/mailsec_policy1_0.xml"
LEGACY_FILES = (LEGACY_POLICY_OBJECTS, LEGACY_SMTP, LEGACY_MAIL_POLICY)
# SMTP setting (dataclass field) -> element name in the 2.8.1 <smtp> section.
_SMTP_ELEMENTS = {
    "listen_port": "listenPort",
    "next_hop": "nextHop",
    "max_message_size": "maxMessageSize",
    "smtp_log_retention_days": "smtpLogRetentionDays",
    "tracking_log_retention_days": "trackingLogRetentionDays",
    "relay_networks": "relayNetworks",
}
_SECTIONS = ("policyObjects", "mailPolicy", "smtp")


@dataclass(frozen=True)
class Configuration:
    """The whole mail-security configuration, format-independent; ``None`` = section absent."""

    policy_objects: tuple[PolicyObject, ...] | None = None
    mail_policy: MailPolicy | None = None
    smtp: SmtpSettings | None = None
    # appliance path -> sha256 recorded in a 2.8.1 <fileRef> (None when not recorded).
    file_refs: tuple[tuple[str, str | None], ...] = ()
    converted_from: str | None = None

    def same_settings(self, other: Configuration) -> bool:
        """Semantic equality: every object, rule and setting (not the recorded digests)."""
        return (
            self.policy_objects == other.policy_objects
            and self.mail_policy == other.mail_policy
            and self.smtp == other.smtp
        )


def _xml_safe(text: str) -> bool:
    """True when XML 1.0 can carry ``text`` verbatim (lxml escapes CR, so it survives)."""
    for char in text:
        code = ord(char)
        if code in (0x9, 0xA, 0xD):
            continue
        if code < 0x20 or 0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF):
            return False
    return True


def macro_path(value: str) -> str | None:
    """The path when ``value`` is EXACTLY a macro; padded macros stay plain values, losslessly."""
    match = FILE_MACRO.match(value)
    if match is None or match.group(0) != value:
        return None
    return match.group(1)


def _render_object(parent: etree._Element, obj: PolicyObject, digests: Mapping[str, str]) -> None:
    if not _xml_safe(obj.name) or not _xml_safe(obj.id) or not _xml_safe(obj.type):
        raise ValueError(f"policy object {obj.id!r}: name, id or type holds control characters")
    element = etree.SubElement(parent, "object", id=obj.id, type=obj.type)
    etree.SubElement(element, "name").text = obj.name
    path = macro_path(obj.value)
    if path is not None:
        ref = etree.SubElement(element, "fileRef", path=path)
        if path in digests:
            ref.set("sha256", digests[path])
    elif _xml_safe(obj.value):
        etree.SubElement(element, "value").text = obj.value
    else:
        value = etree.SubElement(element, "value", encoding="base64")
        value.text = base64.b64encode(obj.value.encode("utf-8")).decode("ascii")


def render_config(
    config: Configuration, digests: Mapping[str, str] | None = None, *, validate: bool = True
) -> bytes:
    """Serialise ``config`` in the 2.8.1 format; ``digests`` maps list paths to their sha256.

    With ``validate`` the same rules as the 2.8.0 writers apply (unique ids, one-line names,
    valid SMTP values), so a configuration valid in one format is valid in the other.
    """
    digests = digests or {}
    root = etree.Element("mailsecConfig", formatVersion=CURRENT_FORMAT)
    if config.converted_from:
        root.set("convertedFrom", config.converted_from)
    if config.policy_objects is not None:
        if validate:
            render_policy_objects(config.policy_objects)  # duplicate ids, multi-line names
        section = etree.SubElement(root, "policyObjects")
        for obj in config.policy_objects:
            _render_object(section, obj, digests)
    if config.mail_policy is not None:
        section = etree.SubElement(root, "mailPolicy")
        rules = etree.SubElement(section, "rules")
        for rule in config.mail_policy.rules:
            element = etree.SubElement(rules, "rule", type=rule.type, objectRef=rule.object_id)
            if rule.threshold is not None:
                element.set("threshold", repr(rule.threshold))  # repr round-trips exactly
            if rule.senders_id is not None:
                element.set("sendersRef", rule.senders_id)
        quarantine = etree.SubElement(section, "quarantine")
        for verdict in QUARANTINE_VERDICTS:
            if verdict in config.mail_policy.quarantine:
                etree.SubElement(
                    quarantine,
                    "store",
                    verdict=verdict,
                    objectRef=config.mail_policy.quarantine[verdict],
                )
    if config.smtp is not None:
        if validate:
            config.smtp.validate()
        section = etree.SubElement(root, "smtp")
        for spec in fields(SmtpSettings):
            text = str(getattr(config.smtp, spec.name))
            if not _xml_safe(text):
                raise ValueError(f"SMTP setting {spec.name} holds control characters")
            etree.SubElement(section, _SMTP_ELEMENTS[spec.name]).text = text
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _children(element: etree._Element) -> list[etree._Element]:
    """Element children only: comments and processing instructions carry no configuration."""
    return [child for child in element if isinstance(child.tag, str)]


def _parse_object(element: etree._Element) -> tuple[PolicyObject, tuple[str, str | None] | None]:
    obj_id, obj_type = element.get("id"), element.get("type")
    if element.tag != "object" or not obj_id or not obj_type:
        raise MalformedApplianceFile("2.8.1 configuration: policy object without id or type")
    name: str | None = None
    value: str | None = None
    ref: tuple[str, str | None] | None = None
    for child in _children(element):
        if child.tag == "name" and name is None:
            name = child.text or ""
        elif child.tag == "value" and value is None:
            text = child.text or ""
            encoding = child.get("encoding")
            if encoding == "base64":
                try:
                    value = base64.b64decode(text.strip(), validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError) as exc:
                    raise MalformedApplianceFile(
                        f"policy object {obj_id}: value is not base64 UTF-8"
                    ) from exc
            elif encoding is None:
                value = text
            else:
                raise MalformedApplianceFile(f"policy object {obj_id}: encoding {encoding!r}")
        elif child.tag == "fileRef" and value is None:
            path = child.get("path") or ""
            try:
                value = file_macro(path)
            except ValueError as exc:
                raise MalformedApplianceFile(f"policy object {obj_id}: {exc}") from exc
            ref = (path, child.get("sha256"))
        else:
            raise MalformedApplianceFile(
                f"policy object {obj_id}: unexpected or repeated element <{child.tag}>"
            )
    if name is None or value is None:
        raise MalformedApplianceFile(f"policy object {obj_id} lacks <name> or a value")
    return PolicyObject(obj_id, name, obj_type, value), ref


def _parse_mail_policy(section: etree._Element) -> MailPolicy:
    rules: list[PolicyRule] = []
    quarantine: dict[str, str] = {}
    try:
        for group in _children(section):
            if group.tag == "rules":
                for element in _children(group):
                    if element.tag != "rule":
                        raise ValueError(f"unexpected element <{element.tag}> in <rules>")
                    rules.append(
                        parse_rule(element, object_attr="objectRef", senders_attr="sendersRef")
                    )
            elif group.tag == "quarantine":
                for element in _children(group):
                    if element.tag != "store":
                        raise ValueError(f"unexpected element <{element.tag}> in <quarantine>")
                    verdict, store = element.get("verdict", ""), element.get("objectRef", "")
                    bind_quarantine(quarantine, verdict, store)
            else:
                raise ValueError(f"unexpected element <{group.tag}> in <mailPolicy>")
        return MailPolicy(tuple(rules), quarantine)
    except MalformedApplianceFile:
        raise
    except ValueError as exc:
        raise MalformedApplianceFile(f"2.8.1 mail policy: {exc}") from exc


def _parse_smtp(section: etree._Element) -> SmtpSettings:
    by_element = {element: name for name, element in _SMTP_ELEMENTS.items()}
    types = {spec.name: spec.type for spec in fields(SmtpSettings)}
    values: dict[str, object] = {}
    for element in _children(section):
        name = by_element.get(str(element.tag))
        if name is None or name in values:
            raise MalformedApplianceFile(f"2.8.1 SMTP settings: unexpected <{element.tag}>")
        text = element.text or ""
        if types[name] in ("int", int):
            try:
                values[name] = int(text.strip())
            except ValueError as exc:
                raise MalformedApplianceFile(f"SMTP setting {name} is not a number") from exc
        else:
            values[name] = text
    return SmtpSettings(**values)  # type: ignore[arg-type]


def parse_config(data: bytes) -> Configuration:
    """Parse a 2.8.1 configuration file (safely, see :mod:`appliance.system.safexml`)."""
    root = parse_xml(data)
    if root.tag != "mailsecConfig":
        raise MalformedApplianceFile(f"2.8.1 configuration: unexpected root <{root.tag}>")
    version = root.get("formatVersion")
    if version != CURRENT_FORMAT:
        raise MalformedApplianceFile(f"configuration format {version!r} is not {CURRENT_FORMAT}")
    converted_from = root.get("convertedFrom")
    if converted_from is not None and converted_from not in CONFIG_FORMATS:
        raise MalformedApplianceFile(f"2.8.1 configuration: convertedFrom {converted_from!r}")
    sections: dict[str, etree._Element] = {}
    for section in _children(root):
        if section.tag not in _SECTIONS or section.tag in sections:
            raise MalformedApplianceFile(f"2.8.1 configuration: unexpected <{section.tag}>")
        sections[str(section.tag)] = section
    objects: tuple[PolicyObject, ...] | None = None
    refs: list[tuple[str, str | None]] = []
    if "policyObjects" in sections:
        parsed = [_parse_object(element) for element in _children(sections["policyObjects"])]
        ids = [obj.id for obj, _ in parsed]
        if len(set(ids)) != len(ids):
            raise MalformedApplianceFile("2.8.1 configuration: duplicate policy object id")
        objects = tuple(obj for obj, _ in parsed)
        refs = [ref for _, ref in parsed if ref is not None]
    return Configuration(
        policy_objects=objects,
        mail_policy=(
            _parse_mail_policy(sections["mailPolicy"]) if "mailPolicy" in sections else None
        ),
        smtp=_parse_smtp(sections["smtp"]) if "smtp" in sections else None,
        file_refs=tuple(refs),
        converted_from=converted_from,
    )


def parse_legacy(files: Mapping[str, bytes]) -> Configuration:
    """The 2.8.0 configuration from its files (keys as :data:`LEGACY_FILES`; absent = None)."""
    objects = files.get(LEGACY_POLICY_OBJECTS)
    policy = files.get(LEGACY_MAIL_POLICY)
    smtp = files.get(LEGACY_SMTP)
    return Configuration(
        policy_objects=tuple(parse_policy_objects(objects)) if objects is not None else None,
        mail_policy=parse_mail_policy(policy) if policy is not None else None,
        smtp=parse_smtp_settings(smtp) if smtp is not None else None,
    )
