"""Credentials of the test users (one per role)."""

ADMIN_PASSWORD = "correct horse battery staple"
READONLY_PASSWORD = "read only eyes 2026"


def bearer(key: str) -> dict[str, str]:
    """The Django test client's keyword arguments sending an API token."""
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}
