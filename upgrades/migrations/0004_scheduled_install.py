"""Install at a time (issue 18): the scheduled install, and "schedule" as an install trigger."""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("upgrades", "0003_downloads_and_installs_on_jobs"),
    ]

    operations = [
        migrations.AlterField(
            model_name="installrun",
            name="trigger",
            field=models.CharField(
                choices=[
                    ("console", "Console"),
                    ("cli", "update-control"),
                    ("api", "API"),
                    ("cluster", "Cluster Central"),
                    ("schedule", "Scheduled install"),
                ],
                default="console",
                max_length=16,
            ),
        ),
        migrations.CreateModel(
            name="ScheduledInstall",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("component", models.CharField(default="fw", max_length=8)),
                ("version", models.CharField(max_length=32)),
                ("at", models.DateTimeField()),
                ("requested_by", models.CharField(blank=True, max_length=150)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "state",
                    models.CharField(
                        choices=[
                            ("pending", "Pending"),
                            ("started", "Started"),
                            ("cancelled", "Cancelled"),
                            ("refused", "Refused"),
                        ],
                        default="pending",
                        max_length=16,
                    ),
                ),
                ("reason", models.TextField(blank=True)),
                ("changed_at", models.DateTimeField(blank=True, null=True)),
                ("changed_by", models.CharField(blank=True, max_length=150)),
                (
                    "run",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to="upgrades.installrun",
                    ),
                ),
            ],
            options={
                "ordering": ("-created_at", "-id"),
                "constraints": [
                    models.UniqueConstraint(
                        condition=models.Q(("state", "pending")),
                        fields=("component",),
                        name="scheduledinstall_one_pending",
                        violation_error_message="An install is already scheduled.",
                    )
                ],
            },
        ),
    ]
