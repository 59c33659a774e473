"""Policy objects, the mail policy and the SMTP settings as stored, in whichever format is on disk.

The parsers and renderers of each part live beside their dataclasses (:mod:`policy`,
:mod:`mailpolicy`, :mod:`smtp`); the 2.8.1 file that holds all three is
:mod:`appliance.config.configformat`, read and written on disk by
:mod:`appliance.config.configconvert`. Reading and writing a part needs both, so it lives here,
above them: the parts never import the format that contains them, and there is no circle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from appliance.config import configconvert
from appliance.config.mailpolicy import (
    MailPolicy,
    mail_policy_path,
    parse_mail_policy,
    render_mail_policy,
)
from appliance.config.policy import PolicyObject, parse_policy_objects, render_policy_objects
from appliance.config.smtp import SmtpSettings, parse_smtp_settings, render_smtp_settings
from appliance.system.paths import layout


def list_policy_objects(root: Path | None = None) -> list[PolicyObject]:
    """All policy objects, in file order, from whichever configuration format is on disk."""
    objects = configconvert.read_section(
        root,
        layout(root).policy_objects_xml,
        parse_policy_objects,
        lambda config: config.policy_objects,
        "policy objects",
    )
    return list(objects)


def get_policy_object(obj_id: str, root: Path | None = None) -> PolicyObject:
    """One policy object by id; ``KeyError`` when there is none."""
    for obj in list_policy_objects(root):
        if obj.id == obj_id:
            return obj
    raise KeyError(obj_id)


def file_macro_objects(root: Path | None = None) -> list[PolicyObject]:
    """The objects whose value is a ``$(FILE/...)`` macro: the files to back up before upgrading."""
    return [obj for obj in list_policy_objects(root) if obj.file_path is not None]


def write_policy_objects(objs: Iterable[PolicyObject], root: Path | None = None) -> None:
    """Atomically replace the policy objects with ``objs``, in the format on disk."""
    objs = tuple(objs)
    configconvert.write_section(
        root,
        layout(root).policy_objects_xml,
        render_policy_objects(objs),
        lambda config: dataclasses.replace(config, policy_objects=objs),
    )


def read_mail_policy(root: Path | None = None) -> MailPolicy:
    """Read the mail policy from whichever configuration format is on disk.

    :class:`ApplianceNotInitialized` when there is none (no file, or no section in 2.8.1).
    """
    return configconvert.read_section(
        root,
        mail_policy_path(root),
        parse_mail_policy,
        lambda config: config.mail_policy,
        "mail policy",
    )


def write_mail_policy(policy: MailPolicy, root: Path | None = None) -> None:
    """Check the policy against the current policy objects, then write it atomically."""
    policy.validate(list_policy_objects(root))
    configconvert.write_section(
        root,
        mail_policy_path(root),
        render_mail_policy(policy),
        lambda config: dataclasses.replace(config, mail_policy=policy),
    )


def read_smtp_settings(root: Path | None = None) -> SmtpSettings:
    """Read the SMTP settings from whichever configuration format is on disk."""
    return configconvert.read_section(
        root,
        layout(root).smtp_xml,
        parse_smtp_settings,
        lambda config: config.smtp,
        "SMTP settings",
    )


def write_smtp_settings(smtp: SmtpSettings, root: Path | None = None) -> None:
    """Validate and atomically write the SMTP settings, in the format on disk."""
    smtp.validate()
    configconvert.write_section(
        root,
        layout(root).smtp_xml,
        render_smtp_settings(smtp),
        lambda config: dataclasses.replace(config, smtp=smtp),
    )
