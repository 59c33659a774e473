"""Login throttling state."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class LoginFailure(models.Model):
    """One failed login, kept for the throttle window; counted per user name and per address.

    Kept in the database rather than a per-process cache so that every gunicorn worker sees the
    same count.
    """

    username = models.CharField(max_length=150)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = (
            models.Index(fields=("username", "created_at"), name="loginfail_user_idx"),
            models.Index(fields=("client_ip", "created_at"), name="loginfail_ip_idx"),
        )

    def __str__(self) -> str:
        return f"{self.username} from {self.client_ip} at {self.created_at}"


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
