"""The LMI Django project: settings, URLs, Celery app, WSGI entry point."""

from lmi.celery import app as celery_app

__all__ = ["celery_app"]
