"""Retention purges become jobs of the engine: their history is copied into jobs.Job."""

from django.db import migrations

FIGURES = (
    "messages_deleted",
    "smtp_log_deleted",
    "tracking_log_deleted",
    "pages_returned",
    "store_bytes_before",
    "store_bytes_after",
    "disk_free_before",
    "disk_free_after",
    "bytes_reclaimed",
)


def copy_runs(apps, schema_editor):
    runs = apps.get_model("mailsecurity", "PurgeRun")
    job = apps.get_model("jobs", "Job")
    for run in runs.objects.order_by("id"):
        finished = run.state in ("succeeded", "failed")
        job.objects.create(
            kind="purge",
            title="Retention purge",
            # A run the old engine left active is ended: the next purge carries on from it.
            state=run.state if finished else "failed",
            error=run.error or ("" if finished else "Interrupted by a console upgrade."),
            requested_by=run.requested_by,
            trigger=run.trigger,
            conflict_group="purge",
            created_at=run.created_at,
            queued_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at or run.started_at or run.created_at,
            steps=4,
            step=4 if run.state == "succeeded" else 0,
            restarts=run.restarts,
            details={
                **run.details,
                **{name: getattr(run, name) for name in FIGURES},
                "reason": run.reason,
            },
        )


class Migration(migrations.Migration):
    dependencies = [
        ("mailsecurity", "0002_purge_run_restarts"),
        ("jobs", "0002_again_requested"),
    ]

    operations = [
        migrations.RunPython(copy_runs, migrations.RunPython.noop),
        migrations.DeleteModel(name="PurgeRun"),
    ]
