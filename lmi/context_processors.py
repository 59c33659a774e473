"""Template context shared by every page: menus, node name, the user's role."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest

from accounts.roles import is_administrator
from lmi.menus import resolved_menus


def console(request: HttpRequest) -> dict[str, object]:
    """Menus for the base layout and whether the user may change things."""
    user = getattr(request, "user", None)
    return {
        "menus": resolved_menus(request.path) if user and user.is_authenticated else [],
        "node_name": settings.NODE_NAME,
        "can_change": bool(user and is_administrator(user)),
    }
