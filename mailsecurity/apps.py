from django.apps import AppConfig


class MailSecurityConfig(AppConfig):
    """The Mail Security menu."""

    name = "mailsecurity"
    verbose_name = "Mail Security"

    def ready(self) -> None:
        from mailsecurity import services

        services.register_job_kinds()
