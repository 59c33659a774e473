from django.apps import AppConfig


class UpgradesConfig(AppConfig):
    """Updates & Licensing."""

    name = "upgrades"
    verbose_name = "Updates & Licensing"

    def ready(self) -> None:
        # A download is a job of the engine. Install runs keep their own records (their
        # phases); the reconciler hands what lost its worker or its message to the worker again
        # on every pass, so a lost phase hand-off or rollback costs one pass, not a worker start.
        from jobs import registry
        from upgrades import downloader, install

        downloader.register_job_kind()
        registry.register_recovery("install", install.installs_recover)
