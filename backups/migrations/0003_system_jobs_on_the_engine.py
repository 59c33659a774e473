"""System backup jobs become jobs of the engine: their history is copied into jobs.Job."""

from django.db import migrations

KINDS = {
    "create": ("system_backup", "System backup"),
    "restore": ("system_restore", "System restore"),
}


def copy_jobs(apps, schema_editor):
    old_jobs = apps.get_model("backups", "SystemBackupJob")
    job = apps.get_model("jobs", "Job")
    for old in old_jobs.objects.order_by("id"):
        kind, title = KINDS[old.kind]
        job.objects.create(
            kind=kind,
            title=title,
            # A job the old engine left active is ended: the new one cannot resume it.
            state=old.state if old.state in ("succeeded", "failed") else "failed",
            error=old.error
            or (
                "" if old.state in ("succeeded", "failed") else "Interrupted by a console upgrade."
            ),
            requested_by=old.requested_by,
            conflict_group="rescue",
            created_at=old.created_at,
            queued_at=old.created_at,
            started_at=old.started_at,
            finished_at=old.finished_at or old.started_at or old.created_at,
            bytes_done=old.bytes_done,
            bytes_total=old.bytes_total,
            restarts=old.restarts,
            details={"firmware_version": old.firmware_version} if old.firmware_version else {},
        )


class Migration(migrations.Migration):
    dependencies = [
        ("backups", "0002_system_job_restarts"),
        ("jobs", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(copy_jobs, migrations.RunPython.noop),
        migrations.DeleteModel(name="SystemBackupJob"),
    ]
