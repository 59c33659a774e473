"""The rolling upgrade gets its record in the job engine (a driven job)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("cluster", "0002_signed_messages"),
        ("jobs", "0002_again_requested"),
    ]

    operations = [
        migrations.AddField(
            model_name="clusterupgrade",
            name="job",
            field=models.OneToOneField(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="cluster_upgrade",
                to="jobs.job",
            ),
        ),
    ]
