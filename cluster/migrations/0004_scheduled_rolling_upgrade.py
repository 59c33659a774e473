"""Issue 18: a scheduled install can be a rolling upgrade of the cluster."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("cluster", "0003_upgrade_job"),
        ("upgrades", "0004_scheduled_install"),
    ]

    operations = [
        migrations.CreateModel(
            name="ScheduledRollingUpgrade",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "schedule",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="rolling_upgrade",
                        to="upgrades.scheduledinstall",
                    ),
                ),
                (
                    "upgrade",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to="cluster.clusterupgrade",
                    ),
                ),
            ],
        ),
    ]
