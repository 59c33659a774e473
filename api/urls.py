"""/api/v1/: the API's routes, exempt from the console's login redirect.

An API client gets 401 with a JSON body, not a redirect to the login page: the API checks
authentication itself (api.auth), including for its OpenAPI description. A URL under /api/v1/
that no operation serves is a JSON 404 too, never the console's HTML page.
"""

from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, JsonResponse
from django.urls import re_path
from django.views.decorators.csrf import csrf_exempt

from api.api import api

patterns, app_name, namespace = api.urls
for pattern in patterns:
    pattern.callback.login_required = False  # read by Django's LoginRequiredMiddleware


@csrf_exempt  # it changes nothing, whatever the method; a session's POST gets the same 404
@login_not_required  # an unknown URL reveals nothing, and needs no login to be told so
def unknown_operation(request: HttpRequest) -> JsonResponse:
    """A URL no operation serves, such as a path parameter that is not of its type
    (/api/v1/updates/install/first): 404 with a ``Problem`` body, as an operation's own 404."""
    return JsonResponse(
        {"detail": f"No API operation serves {request.path}; /api/v1/openapi.json lists them."},
        status=404,
    )


app_name = namespace
urlpatterns = [*patterns, re_path(r"", unknown_operation)]
