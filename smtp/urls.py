from django.urls import path

app_name = "smtp"
urlpatterns: list = []
