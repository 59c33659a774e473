"""Install runs are jobs of the engine: the lease and heartbeat move to the run's job.

A run still active when the console is upgraded gets a queued job whose enqueue counts as lost,
so the reconciler's first pass hands it to a worker, which goes on in the run's phase (or its
rollback).
"""

from datetime import timedelta

import django.db.models.deletion
from django.db import migrations, models
from django.utils import timezone

ACTIVE = ("queued", "running", "rolling_back")


def give_active_runs_a_job(apps, schema_editor):
    run_model = apps.get_model("upgrades", "InstallRun")
    job_model = apps.get_model("jobs", "Job")
    long_ago = timezone.now() - timedelta(days=1)
    for run in run_model.objects.filter(state__in=ACTIVE, job__isnull=True):
        job = job_model.objects.create(
            kind="install",
            state="queued",
            title=f"Install of firmware {run.version}",
            requested_by=run.requested_by,
            trigger=run.trigger,
            created_at=run.created_at,
            queued_at=long_ago,
            step=max(0, run.phase - 1),
            steps=10,
        )
        run_model.objects.filter(pk=run.pk).update(job=job)


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_again_requested"),
        ("upgrades", "0003_downloads_on_jobs"),
    ]

    operations = [
        migrations.RemoveField(model_name="installrun", name="heartbeat_at"),
        migrations.RemoveField(model_name="installrun", name="lease_owner"),
        migrations.AddField(
            model_name="installrun",
            name="job",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="install_run",
                to="jobs.job",
            ),
        ),
        migrations.RunPython(give_active_runs_a_job, migrations.RunPython.noop),
    ]
