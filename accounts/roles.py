"""The two roles of the console. Administrators may change things; Read-only users may look."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group

ADMINISTRATOR = "Administrator"
READ_ONLY = "Read-only"
ROLES = (ADMINISTRATOR, READ_ONLY)


def is_administrator(user: AbstractBaseUser | AnonymousUser) -> bool:
    """True for superusers and members of the Administrator group."""
    if not user.is_authenticated:
        return False
    if getattr(user, "is_superuser", False):
        return True
    cached = getattr(user, "_lmi_is_admin", None)
    if cached is None:
        cached = user.groups.filter(name=ADMINISTRATOR).exists()  # type: ignore[attr-defined]
        user._lmi_is_admin = cached  # type: ignore[attr-defined]
    return bool(cached)


def role_name(user: AbstractBaseUser | AnonymousUser) -> str:
    """The role to show next to the user name."""
    return ADMINISTRATOR if is_administrator(user) else READ_ONLY


def ensure_role_groups() -> None:
    """Create the role groups; they carry no Django permissions, the role is the group name."""
    for name in ROLES:
        Group.objects.get_or_create(name=name)
