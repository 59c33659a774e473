from django.apps import AppConfig


class UpgradesConfig(AppConfig):
    """Updates & Licensing."""

    name = "upgrades"
    verbose_name = "Updates & Licensing"

    def ready(self) -> None:
        # Downloads and installs are jobs of the engine: its reconciler resumes what lost its
        # worker or its message.
        from jobs import registry
        from upgrades import downloader, install, rollback

        downloader.register_job_kind()
        install.register_job_kind()
        from upgrades import rehearsal  # issue 18: the install's conversion on a snapshot

        rehearsal.register_job_kind()
        registry.register_recovery("maintenance", rollback.maintenance_recover)
        # The built-in schedule kind (the install of this appliance) registers on import: an
        # install started now supersedes the pending schedule, whose title its kind gives.
        from upgrades import schedule  # noqa: F401
