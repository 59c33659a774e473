"""Writes of the Home app: sampling this machine's resources for the graphs."""

from __future__ import annotations

import time

import psutil

from home import selectors
from home.models import ResourceSample

# Keep a little over the longest graph range (30 days).
RESOURCE_SAMPLE_RETENTION_SECONDS = 31 * 86400


def resources_sample(now: float | None = None) -> ResourceSample:
    """Measure CPU, memory and the two upgrade disks now, store them, drop expired samples."""
    now = time.time() if now is None else now
    minute = int(now) // 60 * 60
    disks = selectors.upgrade_disks()
    sample, _ = ResourceSample.objects.update_or_create(
        minute=minute,
        defaults={
            # Over one second: the sample stands for the minute better than an instant does.
            "cpu_percent": psutil.cpu_percent(interval=1.0),
            "memory_percent": psutil.virtual_memory().percent,
            "console_disk_percent": disks[0].used_percent,
            "store_disk_percent": disks[1].used_percent,
        },
    )
    ResourceSample.objects.filter(minute__lt=minute - RESOURCE_SAMPLE_RETENTION_SECONDS).delete()
    return sample
