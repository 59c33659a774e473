from django.apps import AppConfig


class ApiConfig(AppConfig):
    """The JSON API; every feature adds its routes in api/routes_*.py."""

    name = "api"
    verbose_name = "API"
