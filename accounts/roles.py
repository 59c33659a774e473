"""The two roles of the console. Administrators may change things; Read-only users may look."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group

ADMINISTRATOR = "Administrator"
READ_ONLY = "Read-only"
ROLES = (ADMINISTRATOR, READ_ONLY)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Paths a read-only user may still POST to: ending their own session.
READ_ONLY_POST_ALLOWED = ("/accounts/logout/",)
READ_ONLY_REFUSAL = "Your account is read-only: ask an administrator to make this change."


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


def role_permits_request(
    user: AbstractBaseUser | AnonymousUser, method: str | None, path: str
) -> bool:
    """Whether the user's role lets this request reach a view: read-only users may only read.

    The one rule for every way in: ReadOnlyRoleMiddleware applies it to session users and the
    API's token authentication to token users, so neither depends on a view remembering to
    check. Anonymous requests pass; whether they need a login is decided elsewhere.
    """
    return (
        method in SAFE_METHODS
        or not user.is_authenticated
        or path in READ_ONLY_POST_ALLOWED
        or is_administrator(user)
    )
