from django.apps import AppConfig


class UpgradesConfig(AppConfig):
    """Updates & Licensing."""

    name = "upgrades"
    verbose_name = "Updates & Licensing"
