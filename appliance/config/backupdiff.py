"""What restoring a configuration backup would change, section by section (the diff page).

Both sides are read by the appliance's own readers: the running configuration from the
appliance root, the backup's from a scratch root holding its files, so the comparison is the
same whichever configuration format either is in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from appliance.config.backupfiles import CPE, hostname, plain_files, scratch_root, store_retention
from appliance.config.backupformat import sha256
from appliance.config.configbackup import LoadedBackup
from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.facts import parse_key_values
from appliance.system.paths import Layout, appliance_root, layout


@dataclass(frozen=True)
class DiffItem:
    """One difference between a backup and the running configuration."""

    section: str
    name: str
    change: str  # "added" | "removed" | "changed" (what the restore would do)
    before: str | None  # running now
    after: str | None  # after the restore


def _items(section: str, before: dict[str, str], after: dict[str, str]) -> list[DiffItem]:
    items = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        change = "added" if old is None else "removed" if new is None else "changed"
        items.append(DiffItem(section, key, change, old, new))
    return items


def _describe_objects(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({name: "type: value [file]"}, {id: name})`` of a root's policy objects."""
    from appliance.config.policy import object_file
    from appliance.config.store import list_policy_objects

    try:
        objects = list_policy_objects(root)
    except (ApplianceError, ValueError):
        return {}, {}
    described: dict[str, str] = {}
    for obj in objects:
        text = f"{obj.type}: {obj.value}"
        if obj.file_path is not None:
            try:
                content = object_file(obj, root).read_bytes()
                lines = len(content.decode("utf-8", "replace").splitlines())
                text += f" ({lines} lines, sha256 {sha256(content)[:12]})"
            except (OSError, ValueError):
                text += " (file missing)"
        described[obj.name] = text
    return described, {obj.id: obj.name for obj in objects}


def _describe_policy(root: Path, names: dict[str, str]) -> dict[str, str]:
    from appliance.config.store import read_mail_policy

    try:
        policy = read_mail_policy(root)
    except (ApplianceError, ValueError):
        return {}
    described: dict[str, str] = {}
    counts: dict[str, int] = {}
    for rule in policy.rules:
        key = f"{rule.type} {names.get(rule.object_id, rule.object_id)}"
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
            key += f" #{counts[key]}"
        parts = []
        if rule.threshold is not None:
            parts.append(f"threshold {rule.threshold:g}")
        if rule.senders_id is not None:
            parts.append(f"senders {names.get(rule.senders_id, rule.senders_id)}")
        described[key] = ", ".join(parts) or "on"
    for verdict, store in policy.quarantine.items():
        described[f"quarantine {verdict}"] = names.get(store, store)
    return described


def _describe_smtp(root: Path) -> dict[str, str]:
    from appliance.config.store import read_smtp_settings

    try:
        smtp = read_smtp_settings(root)
    except (ApplianceError, ValueError):
        return {}
    return {key: str(value) for key, value in dataclasses.asdict(smtp).items()}


def _describe_network(root: Path) -> dict[str, str]:
    described: dict[str, str] = {}
    for path in plain_files(layout(root).network_dir, "*"):
        text = path.read_bytes().decode("utf-8", "replace")
        if path.name.startswith("ifcfg-"):
            interface = path.name.removeprefix("ifcfg-")
            for key, value in parse_key_values(text).items():
                described[f"{interface} {key}"] = value
        else:
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    described[f"{path.name}: {line}"] = "present"
    return described


def _described_hostname(the_layout: Layout) -> str:
    # Restoring a good backup is how a damaged host name is repaired, so the diff shows it.
    try:
        return hostname(the_layout)
    except MalformedApplianceFile as exc:
        return f"({exc})"


def _describe(root: Path, retention: dict[str, int]) -> dict[str, dict[str, str]]:
    objects, names = _describe_objects(root)
    return {
        "Policy objects": objects,
        "Mail policy": _describe_policy(root, names),
        "SMTP settings": _describe_smtp(root),
        "Network": _describe_network(root),
        "Host name": {"hostname": _described_hostname(layout(root))}
        if layout(root).hostname_file.is_file()
        else {},
        "Message store retention": {name: f"{days} days" for name, days in retention.items()},
    }


def backup_diff(loaded: LoadedBackup, root: Path | None = None) -> list[DiffItem]:
    """What a restore of ``loaded`` would change, object by object, section by section.

    ``before`` is the running value, ``after`` the backup's. Message stores that the backup does
    not name keep their retention, so they are not listed.
    """
    base = appliance_root(root)
    running_retention = store_retention(base)
    backup_retention = dict(loaded.appliance_settings.get("store_retention", {}))
    running = _describe(base, {k: v for k, v in running_retention.items() if k in backup_retention})
    with scratch_root(loaded.files) as scratch:
        restored = _describe(scratch, backup_retention)
    items: list[DiffItem] = []
    for section in running:
        items += _items(section, running[section], restored[section])
    # A whole configuration file of a kind the diff does not parse: compare it as a whole.
    current_cpe = {
        p.name: sha256(p.read_bytes()) for p in plain_files(layout(base).cpe_dir, "*.xml")
    }
    backup_cpe = {
        name.removeprefix(CPE): sha256(data)
        for name, data in loaded.files.items()
        if name.startswith(CPE)
    }
    if not items and current_cpe != backup_cpe:
        items += _items(
            "Configuration files",
            {k: f"sha256 {v[:12]}" for k, v in current_cpe.items()},
            {k: f"sha256 {v[:12]}" for k, v in backup_cpe.items()},
        )
    return items


def configuration_description(root: Path | None = None) -> dict[str, dict[str, str]]:
    """A root's configuration as the comparison describes it, section by section, with each
    configuration file's digest (the upgrade rehearsal compares it before and after its
    conversion, which changes the files and should change nothing else)."""
    base = appliance_root(root)
    described = _describe(base, store_retention(base))
    described["Configuration files"] = {
        p.name: f"sha256 {sha256(p.read_bytes())[:12]}"
        for p in plain_files(layout(base).cpe_dir, "*.xml")
    }
    return described


def description_diff(
    before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]
) -> list[DiffItem]:
    """The differences between two :func:`configuration_description` results."""
    items: list[DiffItem] = []
    for section in dict.fromkeys([*before, *after]):
        items += _items(section, before.get(section, {}), after.get(section, {}))
    return items
