"""Reads of System > Users."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth import get_user_model

from accounts.roles import ADMINISTRATOR, READ_ONLY


@dataclass(frozen=True)
class UserRow:
    """One line of the users list."""

    id: int
    username: str
    role: str
    active: bool
    last_login: datetime | None

    @property
    def administrator(self) -> bool:
        return self.role == ADMINISTRATOR


def users_list() -> list[UserRow]:
    """Every console user by name, with the role as the console applies it (accounts.roles):
    superusers and the Administrator group are administrators, everyone else is read-only."""
    users = get_user_model().objects.order_by("username").prefetch_related("groups")
    return [
        UserRow(
            id=user.pk,
            username=user.get_username(),
            role=ADMINISTRATOR
            if user.is_superuser or any(g.name == ADMINISTRATOR for g in user.groups.all())
            else READ_ONLY,
            active=user.is_active,
            last_login=user.last_login,
        )
        for user in users
    ]
