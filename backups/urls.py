from django.urls import path, register_converter

from backups import views


class BackupNameConverter:
    """A configuration backup's file name: no slash, no leading dot (the appliance checks more)."""

    regex = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(BackupNameConverter, "backup_name")

app_name = "backups"
urlpatterns = [
    path("system/", views.system, name="system"),
    path("system/image/", views.system_partial, name="system_partial"),
    path("system/image/create/", views.system_create, name="system_create"),
    path("system/image/restore/", views.system_restore, name="system_restore"),
    path("system/config/create/", views.config_create, name="config_create"),
    path(
        "system/config/create-download/",
        views.config_create_download,
        name="config_create_download",
    ),
    path("system/config/upload/", views.config_upload, name="config_upload"),
    path("system/config/schedule/", views.schedule, name="schedule"),
    path(
        "system/config/<backup_name:name>/download/",
        views.config_download,
        name="config_download",
    ),
    path("system/config/<backup_name:name>/compare/", views.config_compare, name="config_compare"),
    path("system/config/<backup_name:name>/restore/", views.config_restore, name="config_restore"),
    path("system/config/<backup_name:name>/delete/", views.config_delete, name="config_delete"),
]
