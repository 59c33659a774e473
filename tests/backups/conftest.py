"""Helpers of the Backup & Restore tests: posting with the CSRF token, reading the backups dir."""

from __future__ import annotations

from pathlib import Path

from appliance.system.paths import layout

PAGE = "/backup/system/"


def csrf(client) -> dict[str, str]:
    """Load the page once so the client holds the CSRF cookie, and send it as the header."""
    client.get(PAGE)
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def post(client, url: str, data: dict | None = None, *, follow: bool = True):
    return client.post(url, data or {}, follow=follow, **csrf(client))


def backup_files(root: Path) -> list[str]:
    """Every file in the backups directory (leftovers of a refused upload would show here)."""
    directory = layout(root).config_backups_dir
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def tree_bytes(root: Path, *parts: str) -> dict[str, bytes]:
    """path -> bytes of every file under root/parts (to prove nothing changed)."""
    top = root.joinpath(*parts)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(top.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
