from django.apps import AppConfig


class HomeConfig(AppConfig):
    """Home menu pages."""

    name = "home"
    verbose_name = "Home"
