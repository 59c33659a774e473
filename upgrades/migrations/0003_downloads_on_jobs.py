"""Downloads run on the job engine: the lease and heartbeat move to the download's job.

A download still active when the console is upgraded gets a queued job whose enqueue counts as
lost, so the reconciler's first pass hands it to a worker, which resumes the kept part file.
"""

from datetime import timedelta

import django.db.models.deletion
from django.db import migrations, models
from django.utils import timezone

ACTIVE = ("queued", "running", "verifying")


def give_active_downloads_a_job(apps, schema_editor):
    download_model = apps.get_model("upgrades", "Download")
    job_model = apps.get_model("jobs", "Job")
    long_ago = timezone.now() - timedelta(days=1)
    for download in download_model.objects.filter(state__in=ACTIVE, job__isnull=True):
        job = job_model.objects.create(
            kind="download",
            state="queued",
            title=f"Download of firmware {download.version}",
            requested_by=download.requested_by,
            trigger=download.trigger,
            created_at=download.created_at,
            queued_at=long_ago,
            steps=2,
            bytes_total=download.size,
            bytes_done=download.bytes_done,
        )
        download_model.objects.filter(pk=download.pk).update(job=job)


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_again_requested"),
        ("upgrades", "0002_install_runs"),
    ]

    operations = [
        migrations.RemoveField(model_name="download", name="heartbeat_at"),
        migrations.RemoveField(model_name="download", name="lease_owner"),
        migrations.AddField(
            model_name="download",
            name="job",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="download",
                to="jobs.job",
            ),
        ),
        migrations.RunPython(give_active_downloads_a_job, migrations.RunPython.noop),
    ]
