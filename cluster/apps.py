from django.apps import AppConfig


class ClusterConfig(AppConfig):
    """Cluster: Cluster Central, its members, and firmware upgrades in sequence."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "cluster"
    verbose_name = "Cluster"

    def ready(self) -> None:
        from cluster import rolling
        from cluster.bundles import CentralSource
        from upgrades.downloader import register_source_finder

        rolling.register_job_kind()
        register_source_finder(CentralSource.for_bundle)  # a member's bundle from its Central
        from cluster import schedule  # issue 18: Upgrade the cluster at a time

        schedule.register_schedule_kind()
