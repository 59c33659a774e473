"""/api/v1/: the API's routes, exempt from the console's login redirect.

An API client gets 401 with a JSON body, not a redirect to the login page: the API checks
authentication itself (api.auth), including for its OpenAPI description.
"""

from api.api import api

patterns, app_name, namespace = api.urls
for pattern in patterns:
    pattern.callback.login_required = False  # read by Django's LoginRequiredMiddleware

app_name = namespace
urlpatterns = patterns
