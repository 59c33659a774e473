"""The console's menus, mirroring the Lotus Protector Manager: one list, used by every page."""

from __future__ import annotations

from dataclasses import dataclass

from django.urls import NoReverseMatch, reverse


@dataclass(frozen=True)
class MenuItem:
    """A page in a menu: its label and the URL name it links to."""

    label: str
    url_name: str


@dataclass(frozen=True)
class Menu:
    """A top-level menu of the console (Home, System, Updates, ...)."""

    label: str
    items: tuple[MenuItem, ...]


MENUS: tuple[Menu, ...] = (
    Menu(
        "Home",
        (
            MenuItem("Home", "home:index"),
            MenuItem("System", "home:system"),
            MenuItem("Resources", "home:resources"),
        ),
    ),
    Menu("System", (MenuItem("Events", "events:list"), MenuItem("Users", "accounts:users"))),
    Menu("Updates", (MenuItem("Updates & Licensing", "upgrades:index"),)),
    Menu("Backup & Restore", (MenuItem("System", "backups:system"),)),
    Menu(
        "Mail Security",
        (
            MenuItem("Policy Objects", "mailsecurity:policy_objects"),
            MenuItem("Message Stores", "mailsecurity:message_stores"),
            MenuItem("Message Tracking / Reporting", "mailsecurity:message_tracking"),
            MenuItem("Reclaim Disk Space", "mailsecurity:reclaim"),
        ),
    ),
    Menu("SMTP", (MenuItem("Configuration > Maintenance", "smtp:maintenance"),)),
    Menu("Cluster", (MenuItem("Cluster", "cluster:index"),)),
)


def resolved_menus(current_path: str) -> list[dict[str, object]]:
    """The menus with URLs resolved and the current page marked.

    Every menu of the original is shown, so the console's shape is the one administrators
    know; a page not built yet is listed without a link (``url`` None) rather than hidden.
    """
    result: list[dict[str, object]] = []
    for menu in MENUS:
        items = []
        for item in menu.items:
            try:
                url: str | None = reverse(item.url_name)
            except NoReverseMatch:
                url = None
            active = url is not None and current_path == url
            items.append({"label": item.label, "url": url, "active": active})
        result.append(
            {"label": menu.label, "items": items, "active": any(i["active"] for i in items)}
        )
    return result
