"""Credentials of the test users (one per role)."""

ADMIN_PASSWORD = "correct horse battery staple"
READONLY_PASSWORD = "read only eyes 2026"
