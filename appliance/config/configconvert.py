"""The 2.8.1 configuration format and the lossless conversion to it (phase 8 of the upgrade).

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

Which format is on disk is decided by one fact: the 2.8.1 file exists. It is written atomically
and verified before the 2.8.0 files are removed, so a crash in between leaves a complete 2.8.1
file that every reader already uses, and a rerun of :func:`config_convert` just finishes the
clean-up. Writers take a ``flock`` on the ``cpe`` directory itself (no lock file, so a rollback
leaves the directory exactly as it was) so that a section write cannot race a conversion.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from lxml import etree

from appliance.config.mailpolicy import (
    QUARANTINE_VERDICTS,
    MailPolicy,
    PolicyRule,
    parse_mail_policy,
    parse_threshold,
)
from appliance.config.policy import (
    FILE_MACRO,
    PolicyObject,
    file_macro,
    parse_policy_objects,
    render_policy_objects,
)
from appliance.config.smtp import SmtpSettings, parse_smtp_settings
from appliance.system.atomic import atomic_write_bytes, fsync_dir
from appliance.system.errors import ApplianceError, ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.paths import appliance_root, layout, resolve_inside
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

T = TypeVar("T")


class ConfigConvertError(ApplianceError, ValueError):
    """The configuration cannot be converted (or reverted); ``str(exc)`` says why and what to do."""


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


@dataclass(frozen=True)
class CarriedFile:
    """A file a ``$(FILE/...)`` policy object reads, as found when the configuration converted."""

    path: str  # as seen on the appliance
    sha256: str
    size: int


@dataclass(frozen=True)
class ConvertResult:
    """What phase 8 converted, for the run's log and counts."""

    source_format: str
    objects: int
    rules: int
    quarantines: int
    settings: int
    files_carried: tuple[CarriedFile, ...]
    # $(FILE) paths that did not exist before the conversion either (already broken references).
    files_missing: tuple[str, ...] = ()


# --- Paths, format and locking ---------------------------------------------------------------


def config_path(root: Path | None = None) -> Path:
    """Host path of the 2.8.1 configuration file."""
    return layout(root).cpe_dir / Path(CONFIG_FILE).name


def config_format(root: Path | None = None) -> str:
    """``"2.8.1"`` when the 2.8.1 file is on disk, else ``"2.8.0"`` (also for a bare root).

    The 2.8.1 file is only ever renamed into place complete and verified, so its presence alone
    decides, even if a crash left 2.8.0 files next to it.
    """
    return CURRENT_FORMAT if config_path(root).is_file() else LEGACY_FORMAT


@contextlib.contextmanager
def _config_lock(root: Path | None) -> Iterator[None]:
    """Exclusive flock on the cpe directory: one writer or converter at a time, no lock file."""
    directory = layout(root).cpe_dir
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as exc:
        raise ApplianceNotInitialized(f"no configuration directory at {directory}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- The 2.8.1 document ----------------------------------------------------------------------


def _xml_safe(text: str) -> bool:
    """True when XML 1.0 can carry ``text`` verbatim (lxml escapes CR, so it survives)."""
    for char in text:
        code = ord(char)
        if code in (0x9, 0xA, 0xD):
            continue
        if code < 0x20 or 0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF):
            return False
    return True


def _macro_path(value: str) -> str | None:
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
    path = _macro_path(obj.value)
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
                        PolicyRule(
                            type=element.get("type", ""),
                            object_id=element.get("objectRef", ""),
                            threshold=parse_threshold(element.get("threshold")),
                            senders_id=element.get("sendersRef"),
                        )
                    )
            elif group.tag == "quarantine":
                for element in _children(group):
                    verdict, store = element.get("verdict", ""), element.get("objectRef", "")
                    if element.tag != "store" or verdict not in QUARANTINE_VERDICTS or not store:
                        raise ValueError(f"quarantine <{element.tag}> verdict={verdict!r}")
                    if verdict in quarantine:
                        raise ValueError(f"two quarantine stores for {verdict}")
                    quarantine[verdict] = store
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


# --- Reading and writing one section in whichever format is on disk --------------------------


def read_config(root: Path | None = None) -> Configuration | None:
    """The 2.8.1 configuration, or ``None`` when the appliance is still on the 2.8.0 format."""
    try:
        data = config_path(root).read_bytes()
    except FileNotFoundError:
        return None
    return parse_config(data)


def read_section(
    root: Path | None,
    legacy_path: Path,
    parse_legacy_file: Callable[[bytes], T],
    section: Callable[[Configuration], T | None],
    what: str,
) -> T:
    """Read one part of the configuration from the 2.8.1 file, else from its 2.8.0 file.

    If the 2.8.0 file vanished under us, a conversion just finished: read the 2.8.1 file.
    """
    for _ in range(2):
        config = read_config(root)
        if config is not None:
            value = section(config)
            if value is None:
                raise ApplianceNotInitialized(f"no {what} in {config_path(root)}")
            return value
        try:
            data = legacy_path.read_bytes()
        except FileNotFoundError:
            continue
        return parse_legacy_file(data)
    raise ApplianceNotInitialized(f"no {what} at {legacy_path}")


def _file_digests(config: Configuration, base: Path) -> dict[str, str]:
    """sha256 of each existing ``$(FILE)`` list, keyed by appliance path (missing ones left out)."""
    digests: dict[str, str] = {}
    for obj in config.policy_objects or ():
        path = _macro_path(obj.value)
        if path is None or path in digests:
            continue
        try:
            data = resolve_inside(base, path).read_bytes()
        except (OSError, ValueError):
            continue
        digests[path] = hashlib.sha256(data).hexdigest()
    return digests


def write_section(
    root: Path | None,
    legacy_path: Path,
    legacy_bytes: bytes,
    update: Callable[[Configuration], Configuration],
) -> None:
    """Write one part of the configuration in whichever format is on disk.

    ``legacy_bytes`` is the 2.8.0 rendering, produced by the caller first so that the same
    validation applies in both formats; ``update`` returns the 2.8.1 configuration with the
    caller's section replaced. The 2.8.1 file is rewritten whole (read, replace the section,
    render with fresh list digests, atomic write) under the directory lock, so a section write
    can neither lose another's nor land in a 2.8.0 file a conversion is about to remove.
    """
    base = appliance_root(root)
    with _config_lock(base):
        current = read_config(base)
        if current is None:
            atomic_write_bytes(legacy_path, legacy_bytes)
            return
        updated = update(current)
        atomic_write_bytes(config_path(base), render_config(updated, _file_digests(updated, base)))


# --- Conversion ------------------------------------------------------------------------------


def _check_paths(config: Configuration) -> None:
    """Refuse ``$(FILE)`` paths that could never name a file inside the appliance."""
    for obj in config.policy_objects or ():
        path = _macro_path(obj.value)
        if path is None:
            continue
        parts = path.split("/")
        if ".." in parts or "\x00" in path:
            raise ConfigConvertError(
                f"policy object {obj.name!r} names {path!r}, outside the appliance's files: "
                "change the object to a path without '..' and try again"
            )


def _check_carried(config: Configuration, base: Path) -> None:
    """Each list recorded with a digest is still there (its content may since have been edited)."""
    for path, digest in config.file_refs:
        if digest is not None and not resolve_inside(base, path).is_file():
            raise ConfigConvertError(f"the list file {path} was not carried over")


def _counts(
    config: Configuration, source_format: str, digests: Mapping[str, str], base: Path
) -> ConvertResult:
    carried: list[CarriedFile] = []
    missing: list[str] = []
    seen: set[str] = set()
    for obj in config.policy_objects or ():
        path = _macro_path(obj.value)
        if path is None or path in seen:
            continue
        seen.add(path)
        if path not in digests:
            missing.append(path)
            continue
        size = resolve_inside(base, path).stat().st_size
        carried.append(CarriedFile(path, digests[path], size))
    policy = config.mail_policy
    return ConvertResult(
        source_format=source_format,
        objects=len(config.policy_objects or ()),
        rules=len(policy.rules) if policy else 0,
        quarantines=len(policy.quarantine) if policy else 0,
        settings=len(fields(SmtpSettings)) if config.smtp is not None else 0,
        files_carried=tuple(carried),
        files_missing=tuple(missing),
    )


def _convert(legacy: Configuration, digests: Mapping[str, str]) -> bytes:
    """Render ``legacy`` as 2.8.1 and prove the rendering reads back to the same configuration."""
    _check_paths(legacy)
    converted = Configuration(
        policy_objects=legacy.policy_objects,
        mail_policy=legacy.mail_policy,
        smtp=legacy.smtp,
        converted_from=LEGACY_FORMAT,
    )
    try:
        # No validation: an odd but readable 2.8.0 configuration converts as it is.
        data = render_config(converted, digests, validate=False)
    except ValueError as exc:
        raise ConfigConvertError(f"the configuration cannot be written as 2.8.1: {exc}") from exc
    _verify(legacy, data, digests)
    return data


def _verify(legacy: Configuration, data: bytes, digests: Mapping[str, str]) -> None:
    """Every object, rule and setting equal, and every list referenced with its digest."""
    try:
        reread = parse_config(data)
    except ApplianceError as exc:
        raise ConfigConvertError(f"the converted configuration does not read back: {exc}") from exc
    if not reread.same_settings(legacy):
        raise ConfigConvertError("the converted configuration differs from the 2.8.0 one")
    for path, digest in reread.file_refs:
        if digests.get(path) != digest:
            raise ConfigConvertError(f"the converted configuration lost the digest of {path}")


def convert_files(files: Mapping[str, bytes], source_format: str) -> dict[str, bytes]:
    """The same configuration in the current (2.8.1) format; a pure function for old backups.

    ``files`` maps paths relative to the appliance root to contents. The 2.8.0 files are
    replaced by the 2.8.1 file; every other entry is passed through unchanged. A ``$(FILE)``
    list's digest is recorded when the list is among ``files`` (as ``etc/...`` or
    ``files/etc/...``). Raises :class:`ConfigConvertError`, or the XML errors of
    :mod:`appliance.system.safexml`, with a clear message on bad input.
    """
    if source_format not in CONFIG_FORMATS:
        raise ConfigConvertError(
            f"unknown configuration format {source_format!r}: this firmware reads "
            f"{' and '.join(CONFIG_FORMATS)}"
        )
    result = dict(files)
    if source_format == CURRENT_FORMAT:
        if CONFIG_FILE in files:
            parse_config(files[CONFIG_FILE])
            for name in LEGACY_FILES:
                # Leftovers of an interrupted conversion: the 2.8.1 file is authoritative.
                result.pop(name, None)
        return result
    if CONFIG_FILE in files:
        raise ConfigConvertError(
            "the files claim format 2.8.0 but hold a 2.8.1 configuration: refusing to guess"
        )
    present = {name: files[name] for name in LEGACY_FILES if name in files}
    if not present:
        return result
    legacy = parse_legacy(present)
    digests: dict[str, str] = {}
    for obj in legacy.policy_objects or ():
        path = _macro_path(obj.value)
        if path is None:
            continue
        for key in (path.lstrip("/"), "files" + path):
            if key in files:
                digests[path] = hashlib.sha256(files[key]).hexdigest()
                break
    data = _convert(legacy, digests)
    for name in present:
        del result[name]
    result[CONFIG_FILE] = data
    return result


def _rel_target(base: Path, relative: str) -> Path:
    if not relative or relative.startswith("/") or "\\" in relative:
        raise ConfigConvertError(f"not a path relative to the appliance root: {relative!r}")
    try:
        return resolve_inside(base, "/" + relative)
    except ValueError as exc:
        raise ConfigConvertError(str(exc)) from exc


def config_convert(root: Path | None = None) -> ConvertResult:
    """Phase 8: convert ``etc/mailsec/cpe`` to 2.8.1 in place, verified; idempotent.

    Reads the 2.8.0 files, renders and verifies the 2.8.1 file, writes it atomically, reads it
    back and verifies again, and only then removes the 2.8.0 files. A rerun after a crash
    anywhere finds either the untouched 2.8.0 files (start again) or the complete 2.8.1 file
    (finish the clean-up); on an already converted appliance it returns the same counts.
    """
    base = appliance_root(root)
    the_layout = layout(base)
    legacy_paths = {name: base / name for name in LEGACY_FILES}
    with _config_lock(base):
        current = read_config(base)
        if current is not None:
            for path in legacy_paths.values():
                path.unlink(missing_ok=True)
            fsync_dir(the_layout.cpe_dir)
            digests = {path: digest for path, digest in current.file_refs if digest is not None}
            _check_carried(current, base)
            return _counts(current, current.converted_from or CURRENT_FORMAT, digests, base)
        present: dict[str, bytes] = {}
        for name, path in legacy_paths.items():
            with contextlib.suppress(FileNotFoundError):
                present[name] = path.read_bytes()
        if not present:
            raise ApplianceNotInitialized(f"no configuration to convert in {the_layout.cpe_dir}")
        legacy = parse_legacy(present)
        digests = _file_digests(legacy, base)
        data = _convert(legacy, digests)
        target = config_path(base)
        atomic_write_bytes(target, data)
        _verify(legacy, target.read_bytes(), digests)
        for name in present:
            legacy_paths[name].unlink()
        fsync_dir(the_layout.cpe_dir)
        converted = parse_config(data)
        _check_carried(converted, base)
        return _counts(converted, LEGACY_FORMAT, digests, base)


def config_revert(backup_files: Mapping[str, bytes], root: Path | None = None) -> None:
    """Rollback: put the 2.8.0 configuration files back exactly, then remove the 2.8.1 file.

    ``backup_files`` maps paths relative to the appliance root (``etc/mailsec/cpe/...``, and
    any other file saved with them) to their exact bytes. Everything is checked before
    anything is written; the 2.8.1 file goes last, so a crash part-way leaves the 2.8.1
    configuration in force and a rerun completes the revert.
    """
    base = appliance_root(root)
    targets = {name: _rel_target(base, name) for name in backup_files}
    legacy = {name: backup_files[name] for name in LEGACY_FILES if name in backup_files}
    if not legacy and CONFIG_FILE not in backup_files:
        raise ConfigConvertError(
            "the saved files hold no 2.8.0 configuration: refusing to remove the current one"
        )
    parse_legacy(legacy)  # our own saved bytes, but never write what would not read back
    with _config_lock(base):
        for name, data in backup_files.items():
            target = targets[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, bytes(data))
        if CONFIG_FILE not in backup_files:
            config_path(base).unlink(missing_ok=True)
        fsync_dir(layout(base).cpe_dir)
