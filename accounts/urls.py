"""Mounted at the site's root (lmi/urls.py): login and logout live under accounts/, the users
page under System as its menu says (/system/users/)."""

from django.urls import path

from accounts import views

app_name = "accounts"
urlpatterns = [
    path("accounts/login/", views.login_view, name="login"),
    path("accounts/logout/", views.logout_view, name="logout"),
    path("system/users/", views.users, name="users"),
    path("system/users/add/", views.user_add, name="user_add"),
    path("system/users/<int:user_id>/role/", views.user_role, name="user_role"),
    path("system/users/<int:user_id>/disable/", views.user_disable, name="user_disable"),
    path("system/users/<int:user_id>/enable/", views.user_enable, name="user_enable"),
    path("system/users/<int:user_id>/password/", views.user_password, name="user_password"),
]
