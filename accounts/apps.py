from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Users and roles."""

    name = "accounts"
    verbose_name = "Accounts"
