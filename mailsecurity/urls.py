from django.urls import path

app_name = "mailsecurity"
urlpatterns: list = []
