from django.apps import AppConfig


class ClusterConfig(AppConfig):
    """Cluster: Cluster Central, its members, and firmware upgrades in sequence."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "cluster"
    verbose_name = "Cluster"

    def ready(self) -> None:
        from cluster import rolling

        rolling.register_job_kind()
