from django.urls import path

from events import views

app_name = "events"
urlpatterns = [
    path("", views.event_list, name="list"),
    path("tail/", views.event_tail, name="tail"),
    path("export.csv", views.event_export, name="export"),
]
