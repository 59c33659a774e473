from django.urls import path

from upgrades import views

app_name = "upgrades"
urlpatterns = [
    path("licensing/", views.index, name="index"),
    path("licensing/download/", views.download, name="download"),
    path("licensing/download/progress/", views.download_partial, name="download_partial"),
    path("licensing/cancel/", views.cancel, name="cancel"),
    path("licensing/check/", views.check, name="check"),
    path("licensing/settings/", views.update_settings, name="settings"),
    path("licensing/license/", views.license_upload, name="license"),
]
