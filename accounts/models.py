"""Login throttling state and API tokens."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class LoginThrottle(models.Model):
    """The failed-login counter of one key: a user name at a client address, or an address.

    One row per key rather than one row per failure, so that counting an attempt and checking
    the limit are one conditional UPDATE (``WHERE failures < limit``): parallel guesses cannot
    all read "4" and all go on to try a password. Kept in the database rather than a
    per-process cache so that every gunicorn worker sees the same count.

    The counter is forgotten once ``LOGIN_FAILURE_WINDOW_SECONDS`` pass without a failure (the
    cool-off of django-axes), so no window ever holds more than the limit.
    """

    class Scope(models.TextChoices):
        USER_AT_ADDRESS = "user_at_address", "User name at an address"
        ADDRESS = "address", "Address"

    scope = models.CharField(max_length=20, choices=Scope.choices)
    # Lower-cased (user names log in case-insensitively); blank for the ADDRESS scope.
    username = models.CharField(max_length=150, blank=True)
    # Blank when the peer address is unknown: such clients share one counter.
    client_ip = models.CharField(max_length=45, blank=True)
    failures = models.PositiveIntegerField(default=0)
    last_failure_at = models.DateTimeField()

    class Meta:
        constraints = (
            models.UniqueConstraint(
                fields=("scope", "username", "client_ip"), name="loginthrottle_key_unique"
            ),
        )
        indexes = (models.Index(fields=("last_failure_at",), name="loginthrottle_last_idx"),)

    def __str__(self) -> str:
        who = f"{self.username} at {self.client_ip}" if self.username else self.client_ip
        return f"{who}: {self.failures} failures, last at {self.last_failure_at}"


class ApiToken(models.Model):
    """A bearer token for the JSON API, acting as its user (and so with the user's role).

    Only the SHA-256 of the token is stored: a leaked database does not leak working tokens,
    and the token itself is shown once, when it is created.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=8, help_text="The token's first characters, to tell it")
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…) of {self.user_id}"
