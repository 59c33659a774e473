"""URL map: each page lives at a URL that mirrors its menu path (Home > Resources is
/home/resources/, System > Events is /system/events/)."""

from django.contrib.auth.decorators import login_not_required
from django.urls import include, path
from django.views.generic import RedirectView

from home import views as home_views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="home:index", permanent=False)),
    path("", include("accounts.urls")),  # accounts/login/, system/users/ (see accounts.urls)
    path("home/", include("home.urls")),
    path("system/events/", include("events.urls")),
    path("updates/", include("upgrades.urls")),
    path("backup/", include("backups.urls")),
    path("mail-security/", include("mailsecurity.urls")),
    path("smtp/", include("smtp.urls")),
    path("cluster/", include("cluster.urls")),
    path("api/v1/", include("api.urls")),
    path("healthz", login_not_required(home_views.healthz), name="healthz"),
]

# The console's error pages; under /api/ they answer in JSON (lmi/errors.py).
handler400 = "lmi.errors.bad_request"
handler403 = "lmi.errors.permission_denied"
handler404 = "lmi.errors.page_not_found"
handler500 = "lmi.errors.server_error"
