"""A realistic demo appliance: firmware 2.8.0.0 on SUSE Linux Enterprise Server 10.

`make run` and the tests need a box to manage without the real hardware, so this builds one
under the appliance root with everything the upgrade guide talks about: the firmware level it
requires, DHCP and static interfaces, policy objects that use ``$(FILE/...)`` macros (and the
files they name), the mail policy binding them to rules, SMTP settings with log retention and
no next hop (accepted mail goes to a local sink), a filled message store, the active firmware
slot and the system backup image on the rescue partition. Every file is written through the
same functions the console uses, so the demo cannot drift from the formats they read.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from appliance.config.backupmac import appliance_key
from appliance.config.mailpolicy import MailPolicy, PolicyRule
from appliance.config.policy import PolicyObject, file_macro
from appliance.config.smtp import SmtpSettings
from appliance.config.store import write_mail_policy, write_policy_objects, write_smtp_settings
from appliance.mail import demo_store, msgstore, processing
from appliance.system import rescue
from appliance.system.atomic import atomic_write_bytes, atomic_write_text
from appliance.system.errors import ApplianceExists
from appliance.system.facts import appliance_exists, write_firmware_release
from appliance.system.paths import Layout, appliance_root, layout

FIRMWARE_VERSION = "2.8.0.0"
FIRMWARE_RELEASE = {
    "FIRMWARE_VERSION": FIRMWARE_VERSION,
    "MODEL": "IBM System x3650 M3",
    "BUILD": "20120914-1532",
    "SERIAL": "KQ7R2M4",
}
OS_RELEASE = "SUSE Linux Enterprise Server 10 (x86_64)\nVERSION = 10\nPATCHLEVEL = 3\n"
HOSTNAME = "mailsec01.example.com"
ACTIVE_SLOT = "slot-a"

# Where the $(FILE) policy objects point, as seen on the appliance.
LISTS = "/etc/mailsec/lists"

_BLOCKED_SENDERS = """\
# Blocked senders: mail from these addresses is rejected.
# Maintained by postmaster@example.com; one address per line.
offers@promo-deals.test
winner@lucky-winner.test
noreply@crypto-profit.test
newsletter@seo-rank.test
invoice@billing-dept.test
security@account-verify.test
payroll@payroll-update.test
"""

_ALLOWED_DOMAINS = """\
# Allowed domains: never quarantined as spam (partners and suppliers).
partner.example.net
supplier.example.org
logistics.example
lawfirm.example
bank.example
consulting.example.net
"""

# What the spam in the demo message store says (appliance.mail.demo_store): every stored spam
# message has one of these in its subject and one in its text (3 + 2 points, the rule's
# threshold of 5), so today's policy agrees with the verdict it was stored under.
_SPAM_PHRASES = "\n".join(
    (
        "you have won", "limited offer", "no prescription", "cheap meds", "account verification",
        "a week from home", "crypto wallet", "business proposal", "kg in two weeks",
        "exclusive deal", "pre-approved loan", "page one of google", "viewed your profile",
        "claim your prize",
    )
) + "\n"  # fmt: skip

_CONFIDENTIAL_KEYWORDS = """\
# Confidential keywords: outgoing mail containing these goes to "Policy violations".
CONFIDENTIAL
INTERNAL ONLY
Project Falcon
salary review
customer list
board minutes
"""


@dataclass(frozen=True)
class DemoSummary:
    """What ``init_demo`` built, for the command's one-line report and the event it writes."""

    firmware_version: str
    messages: int
    policy_objects: int
    file_macro_objects: int


def _object_id(name: str) -> str:
    """A stable UUID per object name, so the demo's file is the same on every build."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.policyobjects.{HOSTNAME}"))


def _policy_objects() -> list[PolicyObject]:
    def obj(name: str, obj_type: str, value: str) -> PolicyObject:
        return PolicyObject(_object_id(name), name, obj_type, value)

    return [
        obj("Blocked senders", "emailaddresslist", file_macro(f"{LISTS}/blocked_senders.txt")),
        obj("Executive addresses", "emailaddresslist", "ceo@example.com\ncfo@example.com\n"),
        obj("Allowed domains", "domainlist", file_macro(f"{LISTS}/allowed_domains.txt")),
        obj("Internal domains", "domainlist", "example.com\neu.example.com\n"),
        obj(
            "Confidential keywords",
            "keywordlist",
            file_macro(f"{LISTS}/confidential_keywords.txt"),
        ),
        obj("Spam phrases", "keywordlist", _SPAM_PHRASES),
        obj("Maximum message size", "sizelimit", str(20 * 1024 * 1024)),
        obj("Large attachment", "sizelimit", str(10 * 1024 * 1024)),
        # A message store object names its store; its retention lives in the message store.
        *(obj(name, "messagestore", name) for name, _, _, _ in demo_store.DEMO_STORES),
    ]


def _mail_policy() -> MailPolicy:
    """What the mail service applies: the demo's lists, size limit, keywords and stores."""
    store_ids = {verdict: _object_id(name) for name, _, verdict, _ in demo_store.DEMO_STORES}
    return MailPolicy(
        rules=(
            PolicyRule("sender-block", _object_id("Blocked senders")),
            PolicyRule("sender-allow", _object_id("Allowed domains")),
            PolicyRule("size-limit", _object_id("Maximum message size")),
            PolicyRule("spam-keywords", _object_id("Spam phrases"), threshold=5.0),
            # Confidential words in mail the company's own domains send out: policy violation.
            PolicyRule(
                "content-keywords",
                _object_id("Confidential keywords"),
                senders_id=_object_id("Internal domains"),
            ),
        ),
        quarantine={verdict: store_ids[verdict] for verdict in ("spam", "virus", "policy")},
    )


def _write_lists(the_layout: Layout) -> None:
    the_layout.lists_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("blocked_senders.txt", _BLOCKED_SENDERS),
        ("allowed_domains.txt", _ALLOWED_DOMAINS),
        ("confidential_keywords.txt", _CONFIDENTIAL_KEYWORDS),
    ):
        atomic_write_text(the_layout.lists_dir / name, text)


def _write_network(the_layout: Layout) -> None:
    """eth0 on DHCP with its current lease, eth1 static, and a route to the office LAN."""
    the_layout.network_dir.mkdir(parents=True, exist_ok=True)
    the_layout.dhcpcd_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        the_layout.ifcfg("lo"),
        "IPADDR='127.0.0.1'\nNETMASK='255.0.0.0'\nNETWORK='127.0.0.0'\n"
        "BROADCAST='127.255.255.255'\nSTARTMODE='onboot'\nUSERCONTROL='no'\n",
    )
    atomic_write_text(
        the_layout.ifcfg("eth0"),
        "# Internet side: address from the provider's DHCP server\n"
        "BOOTPROTO='dhcp'\nSTARTMODE='auto'\nNAME='eth0'\nUSERCONTROL='no'\n"
        "DHCLIENT_SET_DEFAULT_ROUTE='yes'\n",
    )
    atomic_write_text(
        the_layout.ifcfg("eth1"),
        "# Internal side: the groupware servers relay through this address\n"
        "BOOTPROTO='static'\nSTARTMODE='auto'\nNAME='eth1'\nUSERCONTROL='no'\n"
        "IPADDR='198.51.100.10/24'\n",
    )
    atomic_write_text(
        the_layout.dhcp_lease("eth0"),
        "IPADDR=192.0.2.25\nNETMASK=255.255.255.0\nNETWORK=192.0.2.0\n"
        "BROADCAST=192.0.2.255\nGATEWAY=192.0.2.1\nDOMAIN='example.com'\nDNS=192.0.2.53\n"
        "DHCPSID=192.0.2.1\nLEASETIME=86400\nRENEWALTIME=43200\nREBINDTIME=75600\n"
        "INTERFACE='eth0'\nCLASSID='Linux 2.6.16.60-0.54.5-smp x86_64'\n",
    )
    # The default route comes from DHCP; the office LAN is reached through the internal router.
    atomic_write_text(
        the_layout.routes_file,
        "# Destination  Gateway  Netmask  Interface\n10.20.0.0 198.51.100.1 255.255.0.0 eth1\n",
    )


def _firmware_release_text() -> str:
    return "".join(f"{key}={value}\n" for key, value in FIRMWARE_RELEASE.items())


def _write_system(the_layout: Layout, seed: int) -> None:
    """A small firmware tree in slot-a, and ``system/active`` pointing at it."""
    slot = the_layout.system_dir / ACTIVE_SLOT
    rng = random.Random(seed)  # noqa: S311 - placeholder binary content, not a secret
    files: dict[str, tuple[bytes, int]] = {
        "VERSION": (f"{FIRMWARE_VERSION}\n".encode(), 0o644),
        "etc/firmware-release": (_firmware_release_text().encode(), 0o644),
        "etc/SuSE-release": (OS_RELEASE.encode(), 0o644),
        "bin/mailsecd": (
            b'#!/bin/sh\n# Mail security daemon\nexec /opt/mailsec/lib/mailsecd.bin "$@"\n',
            0o755,
        ),
        "bin/update-control": (
            b"#!/bin/sh\n# Firmware updates: update-control -i fw installs a downloaded update\n"
            b'exec /opt/mailsec/lib/xpu.bin "$@"\n',
            0o755,
        ),
        "lib/libmailsec.so.2.8.0": (b"\x7fELF" + rng.randbytes(48 * 1024), 0o755),
        "lib/libcpe.so.1.1": (b"\x7fELF" + rng.randbytes(16 * 1024), 0o755),
        "share/mailsec/schemas/mailsec_policyobjects1_1.xsd": (
            b'<?xml version="1.0"?>\n<!-- policy objects 1.1 -->\n<xs:schema '
            b'xmlns:xs="http://www.w3.org/2001/XMLSchema"/>\n',
            0o644,
        ),
    }
    for relative, (content, mode) in files.items():
        path = slot / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, content, mode)
    # A relative link, switched by rename so it is never missing: an upgrade flips it the same
    # way to the other slot.
    temporary = the_layout.system_dir / ".active.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(ACTIVE_SLOT, temporary)
    os.replace(temporary, the_layout.active_system)


def _owned_entries(the_layout: Layout) -> set[Path]:
    """The root's top-level entries the appliance layout writes under."""
    owned = (
        the_layout.etc_dir,
        the_layout.msgstore_dir,
        the_layout.dhcpcd_dir,
        the_layout.xpu_dir,
        the_layout.rescue_dir,
        the_layout.system_dir,
    )
    return {the_layout.root / path.relative_to(the_layout.root).parts[0] for path in owned}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def init_demo(
    root: Path | None = None,
    *,
    messages: int = 3000,
    force: bool = False,
    seed: int = 2880,
    graph_days: int = 30,
) -> DemoSummary:
    """Build the demo appliance under the root and return what was built.

    Refuses (:class:`ApplianceExists`) to replace an existing appliance unless ``force``, which
    empties the root first. Without an appliance, leftovers of an interrupted build (anything
    under the layout's own directories) are removed, so a rerun never doubles the message store.
    ``graph_days`` of per-minute processing figures feed the graphs (tests ask for fewer).
    ``etc/firmware-release`` is the marker that an appliance exists, so it is written after
    everything but the system backup image, which must hold it (restoring an image without it
    would leave an appliance without a firmware level): an interrupted build either does not
    count as an appliance or is a whole one whose rescue partition shows no image.
    """
    base = appliance_root(root)
    if appliance_exists(base) and not force:
        raise ApplianceExists(f"an appliance already exists at {base}")
    the_layout = layout(base)
    base.mkdir(parents=True, exist_ok=True)
    stale = list(base.iterdir()) if force else sorted(_owned_entries(the_layout))
    for entry in stale:
        _remove(entry)

    the_layout.etc_dir.mkdir(parents=True)
    atomic_write_text(the_layout.os_release, OS_RELEASE)
    atomic_write_text(the_layout.hostname_file, HOSTNAME + "\n")

    _write_lists(the_layout)
    objects = _policy_objects()
    the_layout.cpe_dir.mkdir(parents=True, exist_ok=True)
    write_policy_objects(objects, base)
    write_mail_policy(_mail_policy(), base)
    write_smtp_settings(
        SmtpSettings(
            listen_port=25,
            # Empty: accepted mail goes to the local sink. A demo never relays off the machine.
            next_hop="",
            max_message_size=20 * 1024 * 1024,
            smtp_log_retention_days=90,
            tracking_log_retention_days=90,
        ),
        base,
    )
    _write_network(the_layout)

    msgstore.create(base)
    appliance_key(base, create=True)  # an appliance has its backup key from its first start
    demo_store.fill_demo(base, messages=messages, seed=seed)
    processing.fill_demo_minutes(base, days=graph_days, seed=seed)

    _write_system(the_layout, seed)
    the_layout.xpu_dir.mkdir(parents=True, exist_ok=True)

    totals = msgstore.totals(base)
    write_firmware_release(dict(FIRMWARE_RELEASE), base)  # the "appliance exists" marker
    rescue.system_backup_create(base)  # after the marker: the image holds the firmware level
    return DemoSummary(
        firmware_version=FIRMWARE_VERSION,
        messages=totals.messages if totals else 0,
        policy_objects=len(objects),
        file_macro_objects=sum(1 for obj in objects if obj.file_path is not None),
    )
