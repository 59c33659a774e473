from django.urls import path

from mailsecurity import views

app_name = "mailsecurity"
urlpatterns = [
    path("policy-objects/", views.policy_objects, name="policy_objects"),
    path("policy-objects/message-stores/", views.message_stores, name="message_stores"),
    path("policy/message-tracking/", views.message_tracking, name="message_tracking"),
    path("quarantine/<int:message_id>/", views.message_detail, name="message_detail"),
    path("quarantine/<int:message_id>/raw/", views.message_download, name="message_download"),
    path("quarantine/confirm/", views.quarantine_confirm, name="quarantine_confirm"),
    path("reclaim/", views.reclaim, name="reclaim"),
    path("reclaim/purge/", views.purge_status, name="purge_status"),
]
