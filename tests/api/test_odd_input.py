"""The API given odd input: a 400 with a JSON ``detail`` sentence, never Django's HTML 500 page;
and its description lists the errors each operation can give (issue 13)."""

from __future__ import annotations

import pytest
from django.test import Client
from ninja.openapi.schema import OpenAPISchema

from api import api as api_module
from events.models import Category
from events.services import event_write
from tests.support.log_filters import WIDEST_RANGE, damaged_link
from tests.support.odd_input import AFTER_YEAR_9999, OUT_OF_RANGE_TIMES, page_link

pytestmark = pytest.mark.django_db

EVENTS = "/api/v1/events"


@pytest.mark.parametrize(
    ("params", "words"),
    [
        pytest.param({"limit": "²"}, "limit", id="superscript-limit"),
        pytest.param({"limit": "0"}, "Page size must be a number", id="zero-limit"),
        *OUT_OF_RANGE_TIMES,
        damaged_link(
            {"after": page_link("2026-01-01T00:00:00+00:00|" + "9" * 30)},
            "cursor-id-of-thirty-nines",
        ),
        damaged_link({"before": page_link(f"{AFTER_YEAR_9999}|1")}, "cursor-time-after-year-9999"),
        damaged_link({"after": "9" * 30}, "thirty-nines-token"),
    ],
)
def test_odd_event_filters_are_a_400_with_a_json_detail(
    admin_client: Client, params: dict[str, str], words: str
) -> None:
    response = admin_client.get(EVENTS, params)

    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail


def test_an_unreadable_parameter_names_the_parameter(admin_client: Client) -> None:
    response = admin_client.get(EVENTS, {"limit": "ten"})

    assert response.status_code == 400
    assert response.json()["detail"].startswith("limit: ")


def test_an_unexpected_error_is_a_json_500_not_the_html_page(
    admin_client: Client, monkeypatch, caplog
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(api_module, "event_page", broken)

    response = admin_client.get(EVENTS)

    assert response.status_code == 500
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"detail": api_module.UNEXPECTED_ERROR}
    assert "the database went away" not in response.content.decode()
    (record,) = [r for r in caplog.records if r.name == "django.request"]
    assert record.exc_info and "the database went away" in str(record.exc_info[1])


def test_a_good_filter_still_pages(admin_client: Client) -> None:
    event_write(category=Category.SYSTEM, message="still listed")

    response = admin_client.get(EVENTS, {"category": "system", **WIDEST_RANGE})

    assert response.status_code == 200
    assert [e["message"] for e in response.json()["events"]] == ["still listed"]


def test_the_description_lists_the_errors_of_the_events_operation(admin_client: Client) -> None:
    schema = admin_client.get("/api/v1/openapi.json").json()

    responses = schema["paths"]["/api/v1/events"]["get"]["responses"]

    assert {"200", "400", "401"} <= set(responses)
    assert "403" not in responses  # a read: read-only accounts may call it
    for status in ("400", "401"):
        body = responses[status]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/Problem"}
    assert schema["components"]["schemas"]["Problem"]["required"] == ["detail"]


def test_the_description_lists_the_role_refusal_on_changes(admin_client: Client) -> None:
    schema = admin_client.get("/api/v1/openapi.json").json()

    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "401" in operation["responses"], (method, path)
            if method != "get":
                assert "403" in operation["responses"], (method, path)


def test_operations_keep_their_own_descriptions_of_shared_codes(admin_client: Client) -> None:
    schema = admin_client.get("/api/v1/openapi.json").json()

    events_400 = schema["paths"]["/api/v1/events"]["get"]["responses"]["400"]

    assert events_400["description"] == "Bad Request"  # from response=, not replaced


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/api/v1/updates/install/first", id="path-parameter-not-an-integer"),
        pytest.param("/api/v1/updates/install/-1/abort", id="negative-run-id"),
        pytest.param("/api/v1/no-such-operation", id="unknown-path"),
    ],
)
def test_a_url_no_operation_serves_is_a_json_404(admin_client: Client, url: str) -> None:
    for response in (admin_client.get(url), admin_client.post(url)):
        assert response.status_code == 404
        assert response["Content-Type"].startswith("application/json")
        assert response.json()["detail"].startswith(f"No API operation serves {url};")


def test_every_shape_in_the_description_is_the_one_its_operation_returns(
    admin_client: Client, monkeypatch
) -> None:
    # Component names are global: ninja kept backups.api.SystemOut for both /backups/system
    # and /system, whose answers then broke their own description.
    clashes: list[str] = []
    seen: dict[str, object] = {}
    add_definitions = OpenAPISchema.add_schema_definitions

    def add_checking_names(self: OpenAPISchema, definitions: dict) -> None:
        clashes.extend(n for n, d in definitions.items() if seen.setdefault(n, d) != d)
        add_definitions(self, definitions)

    monkeypatch.setattr(OpenAPISchema, "add_schema_definitions", add_checking_names)

    schema = admin_client.get("/api/v1/openapi.json").json()

    assert clashes == []
    ok = schema["paths"]["/api/v1/system"]["get"]["responses"]["200"]
    name = ok["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "firmware_version" in schema["components"]["schemas"][name]["required"]
