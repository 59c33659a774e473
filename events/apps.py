from django.apps import AppConfig


class EventsConfig(AppConfig):
    """The event log app."""

    name = "events"
    verbose_name = "Events"
