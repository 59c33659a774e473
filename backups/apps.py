from django.apps import AppConfig


class BackupsConfig(AppConfig):
    """Backup & Restore > System: configuration backups and the system backup image."""

    name = "backups"
    verbose_name = "Backup & Restore"
