"""Resource samples for the processing graphs (CPU, memory and disk, once a minute)."""

from __future__ import annotations

from django.db import models


class ResourceSample(models.Model):
    """What psutil measured in one minute, written by the beat task ``resources_sample``.

    ``minute`` is epoch seconds of the minute's start (UTC), unique, so a second sample in the
    same minute (beat and a manual run) replaces the first instead of doubling the point, and
    graphs bucket by plain integer arithmetic that SQLite and PostgreSQL agree on.
    """

    minute = models.BigIntegerField(unique=True)
    cpu_percent = models.FloatField()
    memory_percent = models.FloatField()
    # Used % of the disks the upgrade's 50% rule is about.
    console_disk_percent = models.FloatField()
    store_disk_percent = models.FloatField()

    def __str__(self) -> str:
        return f"{self.minute}: cpu {self.cpu_percent:.0f}% mem {self.memory_percent:.0f}%"


class ResourceHour(models.Model):
    """Sums of one hour's resource samples, kept beside them by ``resources_sample``.

    Graphs of 7 and 30 days average hours from these (24 times fewer rows than minutes); sums
    and a count, not averages, so that a replaced sample can be taken back out exactly.
    """

    hour = models.BigIntegerField(unique=True)
    samples = models.PositiveIntegerField(default=0)
    cpu_sum = models.FloatField(default=0.0)
    memory_sum = models.FloatField(default=0.0)
    console_disk_sum = models.FloatField(default=0.0)
    store_disk_sum = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"{self.hour}: {self.samples} samples"
