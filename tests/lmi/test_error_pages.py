"""The console's error pages: in the console's layout, in plain words, with a way back; the API
keeps answering in JSON."""

from __future__ import annotations

from django.test import RequestFactory

from accounts.roles import READ_ONLY_REFUSAL
from lmi import errors

HOME_LINK = 'href="/home/"'


def test_a_missing_page_is_the_console_404_with_links_home_and_back(admin_client):
    response = admin_client.get("/no/such/page/", HTTP_REFERER="http://testserver/cluster/")

    html = response.content.decode()
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    assert "<h1>Page not found</h1>" in html and "/no/such/page/" in html
    assert 'id="main-menu"' in html  # the console's layout, menu and all
    assert HOME_LINK in html
    assert 'href="http://testserver/cluster/" data-testid="previous-page"' in html


def test_the_404_offers_no_way_back_to_another_site_or_to_itself(admin_client):
    elsewhere = admin_client.get("/nope/", HTTP_REFERER="https://evil.example/x")
    itself = admin_client.get("/nope/", HTTP_REFERER="http://testserver/nope/")

    assert "evil.example" not in elsewhere.content.decode()
    assert "previous-page" not in itself.content.decode()
    assert HOME_LINK in itself.content.decode()


def test_a_read_only_users_change_is_the_console_403_saying_the_account_is_read_only(
    readonly_client,
):
    response = readonly_client.post(
        "/system/events/", HTTP_REFERER="http://testserver/system/events/"
    )

    html = response.content.decode()
    assert response.status_code == 403
    assert "<h1>Read-only account</h1>" in html and READ_ONLY_REFUSAL in html
    assert 'id="main-menu"' in html and HOME_LINK in html
    assert 'href="http://testserver/system/events/" data-testid="previous-page"' in html


def test_an_administrators_only_view_refuses_with_the_styled_403_past_the_middleware(
    rf: RequestFactory, readonly_user
):
    from upgrades import views

    request = rf.post("/updates/licensing/download/", {"version": "2.8.1.0"})
    request.user = readonly_user

    response = views.download(request)

    assert response.status_code == 403
    assert "Read-only account" in response.content.decode()


def test_the_api_keeps_its_json_errors(readonly_client):
    unknown = readonly_client.get("/api/v1/no-such-operation")
    outside = readonly_client.get("/api/v2/anything")
    refused = readonly_client.post("/api/v1/cluster/tokens", content_type="application/json")

    assert unknown.status_code == 404 and "detail" in unknown.json()
    assert outside.status_code == 404 and "detail" in outside.json()
    assert refused.status_code == 403 and refused.json() == {"detail": READ_ONLY_REFUSAL}


def test_the_500_page_needs_no_database_and_links_home(rf: RequestFactory):
    # No database fixture: pytest-django fails the test if the page touches the database.
    response = errors.server_error(rf.get("/home/", HTTP_REFERER="http://testserver/cluster/"))

    html = response.content.decode()
    assert response.status_code == 500
    assert "Something went wrong" in html and HOME_LINK in html
    assert 'href="http://testserver/cluster/"' in html
    assert 'class="sidebar"' not in html


def test_a_bad_request_is_the_console_400(rf: RequestFactory, admin_user):
    request = rf.get("/home/")
    request.user = admin_user

    response = errors.bad_request(request)

    assert response.status_code == 400 and "<h1>Bad request</h1>" in response.content.decode()
