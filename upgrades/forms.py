"""Forms of Updates & Licensing: which firmware to download, the settings, a license upload."""

from __future__ import annotations

from django import forms

from appliance.firmware.license import MAX_LICENSE


class DownloadForm(forms.Form):
    """Download: the version the administrator clicked (empty: the newest that applies)."""

    version = forms.RegexField(regex=r"^[0-9]+(\.[0-9]+){0,7}$", max_length=32, required=False)


class UpdateSettingsForm(forms.Form):
    """Automatic firmware downloads on or off."""

    automatic_downloads = forms.BooleanField(required=False, label="Automatic firmware downloads")


class LicenseUploadForm(forms.Form):
    """A vendor-signed license file (JSON, at most 64 KiB)."""

    license_file = forms.FileField(label="License file")

    def clean_license_file(self) -> bytes:
        upload = self.cleaned_data["license_file"]
        if upload.size > MAX_LICENSE:
            raise forms.ValidationError(
                f"This file has {upload.size} bytes; a license file has at most {MAX_LICENSE}."
            )
        return upload.read()
