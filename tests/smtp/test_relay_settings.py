"""SMTP > Configuration > Maintenance: the local domains (read-only) and the relay networks."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.http import HttpResponse
from django.test import Client

from appliance.config.store import read_smtp_settings
from events.models import Category, Event

PAGE = "/smtp/configuration/maintenance/"
RELAY = "/smtp/configuration/maintenance/relay/"


def post(client: Client, data: dict[str, str]) -> HttpResponse:
    """Post as a browser does: the CSRF token from the page's cookie in the form."""
    client.get(PAGE)
    token = client.cookies["csrftoken"].value
    return client.post(RELAY, {**data, "csrfmiddlewaretoken": token})  # type: ignore[return-value]


def smtp_file(root: Path) -> Path:
    return root / "etc/mailsec/cpe/mailsec_smtp1_0.xml"


def test_the_page_shows_the_local_domains_and_the_relay_networks(
    admin_client: Client, demo_appliance: Path
) -> None:
    html = admin_client.get(PAGE).content.decode()

    assert "<code>example.com</code>" in html and "<code>eu.example.com</code>" in html
    assert 'data-testid="relay-form"' in html
    assert "Internal domains" in html


def test_an_administrator_saves_relay_networks_in_their_usual_form(
    admin_client: Client, demo_appliance: Path
) -> None:
    response = post(
        admin_client, {"relay_networks": "198.51.100.7/24\r\n2001:DB8::/32, 192.0.2.25"}
    )

    assert response.status_code == 302
    assert read_smtp_settings().relay_networks == "198.51.100.0/24 2001:db8::/32 192.0.2.25/32"
    (event,) = Event.objects.filter(category=Category.SMTP, message__startswith="Relay networks")
    assert event.username == "admin"
    assert event.details["after"] == ["198.51.100.0/24", "2001:db8::/32", "192.0.2.25/32"]
    html = admin_client.get(PAGE).content.decode()
    assert "198.51.100.0/24\n2001:db8::/32\n192.0.2.25/32</textarea>" in html


def test_a_bad_network_is_a_form_error_and_nothing_is_written(
    admin_client: Client, demo_appliance: Path
) -> None:
    before = smtp_file(demo_appliance).read_bytes()

    response = post(admin_client, {"relay_networks": "10.0.0.0/8\nevil.example/24"})

    assert response.status_code == 400
    html = response.content.decode()
    assert 'data-testid="relay-errors"' in html and "evil.example/24" in html
    assert smtp_file(demo_appliance).read_bytes() == before
    assert not Event.objects.filter(message__startswith="Relay networks").exists()


def test_an_out_of_range_prefix_is_refused_too(admin_client: Client, demo_appliance: Path) -> None:
    before = smtp_file(demo_appliance).read_bytes()

    response = post(admin_client, {"relay_networks": "192.0.2.0/33"})

    assert response.status_code == 400
    assert smtp_file(demo_appliance).read_bytes() == before


@pytest.mark.parametrize("network", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "2000::/3"])
def test_a_network_wide_enough_to_open_the_relay_is_refused(
    admin_client: Client, demo_appliance: Path, network: str
) -> None:
    before = smtp_file(demo_appliance).read_bytes()

    response = post(admin_client, {"relay_networks": f"192.0.2.0/24\n{network}"})

    assert response.status_code == 400
    html = response.content.decode()
    assert "too wide" in html and "open relay" in html and network in html
    assert "a large part of the Internet" in html
    assert smtp_file(demo_appliance).read_bytes() == before


def test_the_widest_allowed_networks_are_saved(admin_client: Client, demo_appliance: Path) -> None:
    assert post(admin_client, {"relay_networks": "10.0.0.0/8 2001::/16"}).status_code == 302
    assert read_smtp_settings().relay_networks == "10.0.0.0/8 2001::/16"


def test_a_refused_value_on_disk_is_replaced_by_the_form(
    admin_client: Client, demo_appliance: Path
) -> None:
    """Written by hand, say: the mail service defers mail until the administrator fixes it."""
    path = smtp_file(demo_appliance)
    path.write_text(path.read_text().replace("<relay_networks>", "<relay_networks>0.0.0.0/0"))

    assert post(admin_client, {"relay_networks": "198.51.100.0/24"}).status_code == 302
    assert read_smtp_settings().relay_networks == "198.51.100.0/24"


def test_clearing_the_relay_networks_closes_the_relay(
    admin_client: Client, demo_appliance: Path
) -> None:
    post(admin_client, {"relay_networks": "10.0.0.0/8"})

    assert post(admin_client, {"relay_networks": ""}).status_code == 302

    assert read_smtp_settings().relay_networks == ""
    assert Event.objects.filter(message__startswith="Relay networks cleared").count() == 1


def test_a_read_only_user_sees_the_networks_but_cannot_change_them(
    readonly_client: Client, demo_appliance: Path
) -> None:
    before = smtp_file(demo_appliance).read_bytes()

    assert post(readonly_client, {"relay_networks": "0.0.0.0/0"}).status_code == 403

    assert smtp_file(demo_appliance).read_bytes() == before
    html = readonly_client.get(PAGE).content.decode()
    assert 'data-testid="relay-form"' not in html
    assert "None: mail is accepted for the local domains only." in html
