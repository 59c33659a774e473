"""Downloads and install runs are jobs of the engine: their lease and heartbeat move to the job.

A download or run still active when the console is upgraded gets a queued job whose enqueue
counts as lost, so the reconciler's first pass hands it to a worker, which resumes it from its
own stored state (the kept part file; the run's phase or its rollback).
"""

from datetime import timedelta

import django.db.models.deletion
from django.db import migrations, models
from django.utils import timezone

# model, its active states, the job's kind and title, how many steps
ON_JOBS = (
    ("Download", ("queued", "running", "verifying"), "download", "Download of firmware", 2),
    ("InstallRun", ("queued", "running", "rolling_back"), "install", "Install of firmware", 10),
)


def give_active_work_a_job(apps, schema_editor):
    job_model = apps.get_model("jobs", "Job")
    long_ago = timezone.now() - timedelta(days=1)
    for model_name, active, kind, title, steps in ON_JOBS:
        model = apps.get_model("upgrades", model_name)
        for row in model.objects.filter(state__in=active, job__isnull=True):
            job = job_model.objects.create(
                kind=kind,
                state="queued",
                title=f"{title} {row.version}",
                requested_by=row.requested_by,
                trigger=row.trigger,
                created_at=row.created_at,
                queued_at=long_ago,
                steps=steps,
            )
            model.objects.filter(pk=row.pk).update(job=job)


def job_field(related_name):
    return models.OneToOneField(
        blank=True,
        null=True,
        on_delete=django.db.models.deletion.SET_NULL,
        related_name=related_name,
        to="jobs.job",
    )


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_again_requested"),
        ("upgrades", "0002_install_runs"),
    ]

    operations = [
        migrations.RemoveField(model_name="download", name="heartbeat_at"),
        migrations.RemoveField(model_name="download", name="lease_owner"),
        migrations.AddField(model_name="download", name="job", field=job_field("download")),
        migrations.RemoveField(model_name="installrun", name="heartbeat_at"),
        migrations.RemoveField(model_name="installrun", name="lease_owner"),
        migrations.AddField(model_name="installrun", name="job", field=job_field("install_run")),
        migrations.RunPython(give_active_work_a_job, migrations.RunPython.noop),
    ]
