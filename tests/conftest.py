"""Fixtures shared by the whole suite.

Every test gets its own empty appliance root (nothing reaches var/appliance of a developer's
`make run`). Tests that need a populated appliance ask for ``demo_appliance``. Users come in the
two roles of the console. Real Redis, a real Celery worker and a real browser live in
tests/support/ and are pulled in by the tests that need them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from tests.support.users import ADMIN_PASSWORD, READONLY_PASSWORD, bearer

pytest_plugins = [
    "tests.support.services",
    "tests.support.browser",
    "tests.support.clock",
    "tests.support.enqueue",
]

# Tests write demo appliances, backups and bundles (3 GB in a whole run) and fsync them. On a
# machine with a roomy tmpfs they go to memory: a third off the suite's wall time here, most of
# it pytest deleting an earlier run's files from disk. Each test's folder is removed when it
# passes (tmp_path_retention_policy in pyproject.toml), so memory holds only failures' folders.
TMPFS = Path("/dev/shm")
TMPFS_MIN_FREE = 4 * 1024**3


def _roomy_tmpfs() -> bool:
    try:
        stats = os.statvfs(TMPFS)
    except OSError:
        return False
    return os.access(TMPFS, os.W_OK) and stats.f_bavail * stats.f_frsize >= TMPFS_MIN_FREE


if "PYTEST_DEBUG_TEMPROOT" not in os.environ and _roomy_tmpfs():
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(TMPFS)


# Fixtures that give a test the database; a test with one of them is marked ``database``.
DATABASE_FIXTURES = frozenset(
    {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback",
     "live_server"}
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that touch the database, so a second database runs only those.

    The rest (archives, bundles, the message store, the SMTP engine) never open a connection of
    the console's database: running them again on PostgreSQL would prove nothing new.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & DATABASE_FIXTURES or item.get_closest_marker("django_db"):
            item.add_marker(pytest.mark.database)
    # The modules with slow tests (real processes, kills, browsers) go first, each kept whole:
    # xdist hands tests out in this order, so a 40 s test starts early instead of running alone
    # at the end while the other process idles.
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)  # stable: order kept within


@pytest.fixture(autouse=True)
def short_install_drain(settings) -> None:
    """Phase 3's drain waits for SMTP transactions in flight; tests send none during it."""
    from tests.support.services import TEST_INSTALL_DRAIN_MS

    settings.INSTALL_DRAIN_MS = TEST_INSTALL_DRAIN_MS


@pytest.fixture(autouse=True)
def fast_password_hashing(settings) -> None:
    """Production hashing costs ~0.2 s per login; tests log in hundreds of times."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def appliance_root(tmp_path: Path, settings) -> Iterator[Path]:
    """An empty appliance root per test; the appliance package reads the setting on each call."""
    root = tmp_path / "appliance"
    root.mkdir()
    settings.APPLIANCE_ROOT = root
    yield root


@pytest.fixture(autouse=True)
def update_paths(tmp_path: Path, settings) -> None:
    """Trusted keys, the update feed and var/ per test: never the developer's own var/."""
    settings.VAR_DIR = tmp_path / "var"
    settings.TRUSTED_KEYS = []
    settings.TRUSTED_KEYS_DIR = tmp_path / "var" / "trusted-keys"
    settings.UPDATE_FEED_URL = str(tmp_path / "var" / "update-feed")


@pytest.fixture
def demo_appliance(appliance_root: Path) -> Path:
    """A small but complete demo appliance (200 messages, a day of graphs) under the test's root."""
    from appliance.demo import init_demo

    init_demo(appliance_root, messages=200, graph_days=1)
    return appliance_root


@pytest.fixture
def admin_user(db) -> AbstractBaseUser:
    from accounts.services import user_create

    return user_create("admin", ADMIN_PASSWORD, administrator=True)


@pytest.fixture
def readonly_user(db) -> AbstractBaseUser:
    from accounts.services import user_create

    return user_create("viewer", READONLY_PASSWORD, administrator=False)


@pytest.fixture
def admin_client(admin_user: AbstractBaseUser) -> Client:
    """A Django test client logged in as an administrator (CSRF checks on, as in production)."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    return client


@pytest.fixture
def readonly_client(readonly_user: AbstractBaseUser) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(readonly_user)
    return client


@pytest.fixture
def admin_token(admin_user: AbstractBaseUser) -> dict[str, str]:
    """An administrator's API token, as keyword arguments of a test client's request."""
    from accounts.services import api_token_create

    return bearer(api_token_create(admin_user, "ci"))


@pytest.fixture
def viewer_token(readonly_user: AbstractBaseUser) -> dict[str, str]:
    """A read-only user's API token, as keyword arguments of a test client's request."""
    from accounts.services import api_token_create

    return bearer(api_token_create(readonly_user, "monitoring"))
