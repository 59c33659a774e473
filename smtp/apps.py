from django.apps import AppConfig


class SmtpConfig(AppConfig):
    """The SMTP menu and the mail processing service."""

    name = "smtp"
    verbose_name = "SMTP"
