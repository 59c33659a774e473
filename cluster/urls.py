from django.urls import path

from cluster import bundle_views, views

app_name = "cluster"
urlpatterns = [
    path("", views.index, name="index"),
    path("progress/", views.progress, name="progress"),
    path("tokens/", views.token_create, name="token_create"),
    path("join/", views.join, name="join"),
    path("upgrade/", views.upgrade, name="upgrade"),
    path("members/<str:node>/remove/", views.member_remove, name="member_remove"),
    path("bundles/<str:version>/<str:sha256>/", bundle_views.bundle, name="bundle"),
]
