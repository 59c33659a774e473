from django.urls import path

from home import views

app_name = "home"
urlpatterns = [
    path("", views.index, name="index"),
    path("notifications/", views.notifications_partial, name="notifications"),
    path("graphs/", views.graphs_partial, name="graphs"),
    path("system/", views.system, name="system"),
    path("resources/", views.resources, name="resources"),
    path("resources/partial/", views.resources_partial, name="resources_partial"),
]
