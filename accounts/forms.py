"""The login form."""

from django import forms


class LoginForm(forms.Form):
    """User name and password; authentication and throttling live in accounts.services."""

    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autofocus": True}))
    password = forms.CharField(max_length=4096, strip=False, widget=forms.PasswordInput)
