from django.apps import AppConfig


class BackupsConfig(AppConfig):
    """Backup & Restore > System: configuration backups and the system backup image."""

    name = "backups"
    verbose_name = "Backup & Restore"

    def ready(self) -> None:
        from backups import services, system_image

        services.register_job_kinds()
        system_image.register_job_kinds()
