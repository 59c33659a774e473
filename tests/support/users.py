"""Credentials of the test users (one per role)."""

ADMIN_PASSWORD = "correct horse battery staple"  # noqa: S105 - test credential
READONLY_PASSWORD = "read only eyes 2026"  # noqa: S105 - test credential
