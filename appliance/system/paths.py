"""Where the appliance's files live under the appliance root.

The paths mirror the original SUSE-based appliance (``/etc/mailsec/cpe/...``,
``/var/spool/updates/XPU``) so the guide's commands and file names apply unchanged; only the
root differs, which is what lets tests and the demo run against a temporary directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# A firmware slot: "slot-" and a short lower-case name ("slot-a", "slot-b", "slot-restored-...").
_SLOT_NAME = re.compile(r"slot-[a-z0-9][a-z0-9-]{0,62}")


def appliance_root(root: Path | None = None) -> Path:
    """Return the appliance root: ``root`` if given, else ``settings.APPLIANCE_ROOT``.

    The setting is read on every call, never at import time, so tests can override it with
    pytest-django's ``settings`` fixture.
    """
    if root is not None:
        return Path(root)
    configured = getattr(settings, "APPLIANCE_ROOT", None)
    if not configured:
        raise ImproperlyConfigured("settings.APPLIANCE_ROOT is not set")
    return Path(configured)


@dataclass(frozen=True)
class Layout:
    """The appliance's well-known paths under one root (as absolute host paths)."""

    root: Path

    @property
    def etc_dir(self) -> Path:
        return self.root / "etc"

    @property
    def firmware_release(self) -> Path:
        """key=value lines: FIRMWARE_VERSION, MODEL, BUILD, SERIAL."""
        return self.etc_dir / "firmware-release"

    @property
    def os_release(self) -> Path:
        """The SUSE release the firmware runs on (``/etc/SuSE-release``)."""
        return self.etc_dir / "SuSE-release"

    @property
    def hostname_file(self) -> Path:
        return self.etc_dir / "HOSTNAME"

    @property
    def cpe_dir(self) -> Path:
        """Mail-security configuration (policy objects, SMTP) in XML."""
        return self.etc_dir / "mailsec" / "cpe"

    @property
    def policy_objects_xml(self) -> Path:
        return self.cpe_dir / "mailsec_policyobjects1_1.xml"

    @property
    def smtp_xml(self) -> Path:
        return self.cpe_dir / "mailsec_smtp1_0.xml"

    @property
    def lists_dir(self) -> Path:
        """Where the demo keeps the files that ``$(FILE/...)`` policy objects refer to."""
        return self.etc_dir / "mailsec" / "lists"

    @property
    def network_dir(self) -> Path:
        return self.etc_dir / "sysconfig" / "network"

    @property
    def routes_file(self) -> Path:
        return self.network_dir / "routes"

    @property
    def dhcpcd_dir(self) -> Path:
        """DHCP client state: the currently leased address of each DHCP interface."""
        return self.root / "var" / "lib" / "dhcpcd"

    @property
    def msgstore_dir(self) -> Path:
        """The message store's own directory, so it can sit on its own disk."""
        return self.root / "var" / "lib" / "mailsec" / "msgstore"

    @property
    def msgstore_db(self) -> Path:
        return self.msgstore_dir / "msgstore.db"

    @property
    def maintenance_file(self) -> Path:
        """Present while the appliance is in maintenance mode (mail answered with 421)."""
        return self.root / "var" / "lib" / "mailsec" / "maintenance.json"

    @property
    def license_file(self) -> Path:
        """The signed license: customer, serial and how long firmware updates are included."""
        return self.etc_dir / "mailsec" / "license.json"

    @property
    def mail_spool_dir(self) -> Path:
        """Accepted messages waiting for delivery to the next hop (survive a restart)."""
        return self.root / "var" / "spool" / "mailsec" / "outgoing"

    @property
    def mail_sink_dir(self) -> Path:
        """Local delivery when no next hop is configured: one file per delivered message."""
        return self.root / "var" / "spool" / "mailsec" / "delivered"

    @property
    def rescue_dir(self) -> Path:
        """The rescue partition, holding the one system backup image."""
        return self.root / "rescue"

    @property
    def system_backup_tar(self) -> Path:
        return self.rescue_dir / "system-backup.tar"

    @property
    def system_backup_manifest(self) -> Path:
        return self.rescue_dir / "system-backup.json"

    @property
    def system_dir(self) -> Path:
        """Firmware slots (``slot-a``, later ``slot-b``) and the ``active`` symlink."""
        return self.root / "system"

    @property
    def active_system(self) -> Path:
        """Symlink to the running firmware slot; switched atomically by an upgrade."""
        return self.system_dir / "active"

    @property
    def firmware_state_dir(self) -> Path:
        """Per-slot state (bootable or not, tree manifest) and the switch record, beside the slots.

        Kept out of the slots themselves so a slot holds exactly its system image, and on the same
        file system so a staged slot can be renamed into place.
        """
        return self.system_dir / ".firmware"

    @property
    def firmware_staging_dir(self) -> Path:
        """Where a firmware slot is unpacked and read back before it is renamed into ``system/``."""
        return self.firmware_state_dir / "staging"

    def slot_dir(self, slot: str) -> Path:
        """The directory of one firmware slot (``slot-a``, ``slot-b``, ...), name checked."""
        if not _SLOT_NAME.fullmatch(slot or ""):
            raise ValueError(f"invalid firmware slot name: {slot!r}")
        return self.system_dir / slot

    @property
    def xpu_dir(self) -> Path:
        """Firmware update logs (``/var/spool/updates/XPU``)."""
        return self.root / "var" / "spool" / "updates" / "XPU"

    @property
    def config_backups_dir(self) -> Path:
        """Configuration backups (``*.lmibak``) made, scheduled or uploaded on this appliance."""
        return self.root / "var" / "lib" / "mailsec" / "backups"

    @property
    def backup_key(self) -> Path:
        """The key that seals this appliance's configuration backups (never inside one)."""
        return self.root / "var" / "lib" / "mailsec" / "backup.key"

    @property
    def config_restore_journal(self) -> Path:
        """Present only while a configuration restore is being applied (for crash recovery)."""
        return self.root / "var" / "lib" / "mailsec" / "config-restore.json"

    @property
    def config_restore_lock(self) -> Path:
        """Held while a configuration restore runs, so two restores cannot interleave."""
        return self.root / "var" / "lib" / "mailsec" / ".config-restore.lock"

    @property
    def system_restore_journal(self) -> Path:
        """Present only while a system backup restore switches trees (for crash recovery)."""
        return self.rescue_dir / "system-restore.json"

    def ifcfg(self, interface: str) -> Path:
        """The SUSE ``ifcfg-<name>`` file of one network interface."""
        if not interface or "/" in interface or interface.startswith("."):
            raise ValueError(f"invalid interface name: {interface!r}")
        return self.network_dir / f"ifcfg-{interface}"

    def dhcp_lease(self, interface: str) -> Path:
        """The dhcpcd lease file of one interface (``dhcpcd-<name>.info``)."""
        if not interface or "/" in interface or interface.startswith("."):
            raise ValueError(f"invalid interface name: {interface!r}")
        return self.dhcpcd_dir / f"dhcpcd-{interface}.info"


def layout(root: Path | None = None) -> Layout:
    """Return the :class:`Layout` of the given or configured appliance root."""
    return Layout(appliance_root(root))


def resolve_inside(root: Path, appliance_path: str) -> Path:
    """Map an absolute path as seen on the appliance to the host path under ``root``.

    Policy objects name files such as ``/etc/mailsec/lists/blocked_senders.txt``; those strings
    come from editable configuration, so a hostile or careless value must not reach outside the
    appliance root. ``..`` components are refused outright (no legitimate appliance path needs
    them), and the fully resolved result, after following symlinks, must still be inside the
    resolved root.

    Raises ``ValueError`` when the path is not absolute, contains ``..`` or a NUL byte, or
    resolves outside the root.
    """
    if not appliance_path.startswith("/"):
        raise ValueError(f"appliance path must be absolute: {appliance_path!r}")
    if "\x00" in appliance_path:
        raise ValueError("appliance path contains a NUL byte")
    parts = [part for part in appliance_path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"appliance path must not contain '..': {appliance_path!r}")
    real_root = Path(os.path.realpath(root))
    candidate = real_root.joinpath(*parts)
    resolved = Path(os.path.realpath(candidate))
    if resolved != real_root and not resolved.is_relative_to(real_root):
        raise ValueError(f"appliance path escapes the appliance root: {appliance_path!r}")
    return resolved
