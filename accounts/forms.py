"""The login form and the forms of System > Users."""

from __future__ import annotations

from typing import Any

from django import forms

from accounts.roles import READ_ONLY, ROLES


class LoginForm(forms.Form):
    """User name and password; authentication and throttling live in accounts.services."""

    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autofocus": True}))
    password = forms.CharField(max_length=4096, strip=False, widget=forms.PasswordInput)


ROLE_CHOICES = [(role, role) for role in ROLES]


class _NewPasswordForm(forms.Form):
    """A new password asked twice: a typo would lock the user out from the first login."""

    password = forms.CharField(
        max_length=4096,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        label="Password",
    )
    password_again = forms.CharField(
        max_length=4096,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        label="Password again",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if "password" in data and data["password"] != data.get("password_again"):
            self.add_error("password_again", "The two passwords differ: type the same one twice.")
        return data


class UserCreateForm(_NewPasswordForm):
    """A new console user: name, role and password. The service checks the name is free and
    the password passes Django's validators, so the command line gets the same rules."""

    username = forms.CharField(
        max_length=150, label="User name", widget=forms.TextInput(attrs={"autocomplete": "off"})
    )
    role = forms.ChoiceField(choices=ROLE_CHOICES, initial=READ_ONLY, widget=forms.RadioSelect)

    field_order = ("username", "role", "password", "password_again")


class PasswordResetForm(_NewPasswordForm):
    """The new password an administrator gives a user."""


class RoleForm(forms.Form):
    """The role a change of role gives, sent explicitly so that a repeated POST repeats the
    same change instead of flipping it back."""

    role = forms.ChoiceField(choices=ROLE_CHOICES)
