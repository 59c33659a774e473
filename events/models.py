"""The event log: one row per thing that happened on the appliance or in the console."""

from __future__ import annotations

from django.db import models


class Severity(models.IntegerChoices):
    """Severity levels; the event log filters by a floor (this level and above)."""

    DEBUG = 10, "Debug"
    INFO = 20, "Info"
    WARNING = 30, "Warning"
    ERROR = 40, "Error"
    CRITICAL = 50, "Critical"


class Category(models.TextChoices):
    """What part of the appliance an event is about."""

    AUTH = "auth", "Authentication"
    SYSTEM = "system", "System"
    UPDATE = "update", "Updates"
    BACKUP = "backup", "Backup & Restore"
    MAIL = "mail", "Mail Security"
    SMTP = "smtp", "SMTP"
    CLUSTER = "cluster", "Cluster"
    CONFIG = "config", "Configuration"


class Event(models.Model):
    """One entry of System > Events. Written only by events.services.event_write.

    The user is kept as a name, not a foreign key: the log must still say who did something after
    that account is deleted, and events reported by cluster members name users Central lacks.
    Ordering is (created_at, id) descending; the indexes below serve keyset paging with and
    without a category filter, a severity level, or both (a severity floor is read one level at
    a time, see events.selectors).
    """

    created_at = models.DateTimeField()
    severity = models.PositiveSmallIntegerField(choices=Severity.choices, default=Severity.INFO)
    category = models.CharField(max_length=16, choices=Category.choices)
    node = models.CharField(max_length=64)
    username = models.CharField(max_length=150, blank=True)
    message = models.CharField(max_length=500)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        indexes = (
            models.Index(fields=("-created_at", "-id"), name="event_time_idx"),
            models.Index(fields=("category", "-created_at", "-id"), name="event_cat_time_idx"),
            models.Index(fields=("severity", "-created_at", "-id"), name="event_sev_time_idx"),
            models.Index(
                fields=("category", "severity", "-created_at", "-id"), name="event_cat_sev_time_idx"
            ),
        )

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.get_severity_display()} {self.message}"
