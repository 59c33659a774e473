from django.apps import AppConfig


class UpgradesConfig(AppConfig):
    """Updates & Licensing."""

    name = "upgrades"
    verbose_name = "Updates & Licensing"

    def ready(self) -> None:
        # Downloads and install runs keep their own records (their phases, their bytes); the
        # job engine's reconciler hands what lost its worker or its message to the worker again
        # on every pass, so a lost phase hand-off or rollback costs one pass, not a worker start.
        from jobs import registry
        from upgrades import install, services

        registry.register_recovery("install", install.installs_recover)
        registry.register_recovery("download", lambda: services.downloads_recover(stale_only=True))
