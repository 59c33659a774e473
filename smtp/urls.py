from django.urls import path

from smtp import views

app_name = "smtp"
urlpatterns = [
    path("configuration/maintenance/", views.maintenance, name="maintenance"),
    path("configuration/maintenance/mode/", views.maintenance_mode, name="maintenance_mode"),
    path("configuration/maintenance/relay/", views.relay_networks, name="relay_networks"),
]
