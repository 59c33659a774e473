from django.apps import AppConfig


class MailSecurityConfig(AppConfig):
    """The Mail Security menu."""

    name = "mailsecurity"
    verbose_name = "Mail Security"
