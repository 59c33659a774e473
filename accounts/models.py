"""Login throttling state."""

from __future__ import annotations

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
