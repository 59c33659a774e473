"""Django app configuration for the appliance package (no models: its state lives on disk)."""

from django.apps import AppConfig


class ApplianceConfig(AppConfig):
    """Registers the package so its management commands (``init_appliance``) are found."""

    name = "appliance"
    verbose_name = "Appliance"
