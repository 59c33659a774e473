from django.urls import path

from mailsecurity import views

app_name = "mailsecurity"
urlpatterns = [
    path("policy-objects/", views.policy_objects, name="policy_objects"),
    path("policy-objects/message-stores/", views.message_stores, name="message_stores"),
    path("policy/message-tracking/", views.message_tracking, name="message_tracking"),
    path("reclaim/", views.reclaim, name="reclaim"),
    path("reclaim/purge/", views.purge_status, name="purge_status"),
]
