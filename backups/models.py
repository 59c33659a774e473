"""The console's record of Backup & Restore: the backup schedule (system backup jobs are Jobs).

Configuration backups themselves live on the appliance (appliance.config.configbackup); the console
keeps only what the appliance has no place for: when to make scheduled backups.
"""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

KEEP_LAST_MAX = 90


class BackupSettings(models.Model):
    """The schedule of configuration backups (one row, pk=1).

    ``last_scheduled_on`` is the local date of the last scheduled backup; the hourly beat claims
    a day by a conditional update of it, so two beats (or a restarted beat) never make two
    backups on one day.
    """

    scheduled_enabled = models.BooleanField(default=True)
    scheduled_hour = models.PositiveSmallIntegerField(
        default=2, validators=[MinValueValidator(0), MaxValueValidator(23)]
    )
    keep_last = models.PositiveSmallIntegerField(
        default=7, validators=[MinValueValidator(1), MaxValueValidator(KEEP_LAST_MAX)]
    )
    last_scheduled_on = models.DateField(null=True, blank=True)
    changed_at = models.DateTimeField(null=True, blank=True)
    changed_by = models.CharField(max_length=150, blank=True)

    class Meta:
        constraints = (
            models.CheckConstraint(
                condition=Q(scheduled_hour__lte=23), name="backupsettings_hour_of_day"
            ),
            models.CheckConstraint(
                condition=Q(keep_last__gte=1, keep_last__lte=KEEP_LAST_MAX),
                name="backupsettings_keep_last_range",
            ),
        )

    def __str__(self) -> str:
        state = f"daily at {self.scheduled_hour:02d}:00" if self.scheduled_enabled else "off"
        return f"Scheduled configuration backups {state}, keep {self.keep_last}"


# The system backup image is written and restored by jobs of the engine (jobs.models.Job), of
# these kinds, one at a time with every job that changes the appliance (jobs.APPLIANCE_GROUP).
SYSTEM_BACKUP = "system_backup"
SYSTEM_RESTORE = "system_restore"
SYSTEM_KINDS = (SYSTEM_BACKUP, SYSTEM_RESTORE)

# Configuration backups are made and restored in the process that asks (they take a second),
# as jobs of the engine of these kinds: in the one history, one restore at a time, and a restore
# whose process died is finished from its journal by a worker (the reconciler resumes it).
CONFIG_BACKUP = "config_backup"
CONFIG_RESTORE = "config_restore"
