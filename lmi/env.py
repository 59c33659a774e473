"""Typed readers for LMI_* environment variables.

Settings come only from the environment (as in healthchecks): each helper refuses a bad value
with ImproperlyConfigured at start-up instead of letting it surface later as a strange error.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

PREFIX = "LMI_"


def env_str(name: str, default: str = "") -> str:
    """Return LMI_<name>, or the default when it is unset or empty."""
    return os.environ.get(PREFIX + name, "") or default


def env_bool(name: str, default: bool = False) -> bool:
    """Return LMI_<name> as a boolean; accepts 1/0, true/false, yes/no, on/off."""
    raw = os.environ.get(PREFIX + name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{PREFIX}{name}={raw!r} is not a boolean (use true or false)")


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    """Return LMI_<name> as an integer, refusing non-numbers and values below the minimum."""
    raw = os.environ.get(PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{PREFIX}{name}={raw!r} is not an integer") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{PREFIX}{name}={value} is below the minimum {minimum}")
    return value


def env_path(name: str, default: Path) -> Path:
    """Return LMI_<name> as an absolute path."""
    raw = os.environ.get(PREFIX + name, "").strip()
    return Path(raw).expanduser().resolve() if raw else default


def env_list(name: str, default: list[str]) -> list[str]:
    """Return LMI_<name> split on commas, blanks dropped."""
    raw = os.environ.get(PREFIX + name, "")
    if not raw.strip():
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]
