"""Return to the previous firmware (issue 18): an install run goes one of two ways."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("upgrades", "0004_scheduled_install"),
    ]

    operations = [
        migrations.AddField(
            model_name="installrun",
            name="direction",
            field=models.CharField(
                choices=[("upgrade", "Upgrade"), ("return", "Return to the previous firmware")],
                default="upgrade",
                max_length=8,
            ),
        ),
    ]
