from django.urls import path

from upgrades import views

app_name = "upgrades"
urlpatterns = [
    path("licensing/", views.index, name="index"),
]
