"""Return to 2.8.0.0 on the Install page, its confirmation, the API and update-control --return:
login, read-only users refused server side, CSRF, and what each surface says.

Each test upgrades its demo appliance in this process first (a real upgrade's kept parts).
"""

from __future__ import annotations

import pytest
from django.test import Client

from tests.support.smtp import (
    smtp_service,  # noqa: F401
)
from tests.upgrades.conftest import update_control
from tests.upgrades.test_install import (  # noqa: F401
    NEW_VERSION,
    OLD_VERSION,
    roomy_preflight_disk,
)
from tests.upgrades.test_return_services import upgraded  # noqa: F401
from upgrades.models import InstallRun, InstallState

pytestmark = [pytest.mark.integration]

INSTALL = "/updates/licensing/install/"
CONFIRM = "/updates/licensing/install/return/"
API = "/api/v1/updates/install/return"


def _csrf(client: Client) -> dict[str, str]:
    client.get(INSTALL)
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def _returns() -> list[InstallRun]:
    return list(InstallRun.objects.filter(direction="return"))


def test_the_install_page_offers_the_return_until_its_date_and_confirms_first(
    upgraded: InstallRun,  # noqa: F811
    admin_client: Client,
    readonly_client: Client,
) -> None:
    page = admin_client.get(INSTALL).content.decode()
    assert 'data-testid="return-panel"' in page and 'data-testid="return"' in page
    assert f"firmware {OLD_VERSION} can be returned to until" in page
    viewer = readonly_client.get(INSTALL).content.decode()
    assert 'data-testid="return-panel"' in viewer and 'data-testid="return"' not in viewer

    confirm = admin_client.get(CONFIRM).content.decode()
    assert f"Return to firmware {OLD_VERSION}" in confirm
    assert "changes made since the upgrade" in confirm and "are lost" in confirm
    assert "Every message is kept, including the mail that arrived since" in confirm
    assert "about as long as during the install" in confirm
    assert 'data-testid="return-confirm"' in confirm
    assert 'data-testid="return-confirm"' not in readonly_client.get(CONFIRM).content.decode()
    assert _returns() == []  # looking changes nothing


def test_the_return_needs_a_login_an_administrator_and_a_csrf_token(
    upgraded: InstallRun,  # noqa: F811
    admin_client: Client,
    readonly_client: Client,
) -> None:
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.get(CONFIRM).status_code == 302
    assert anonymous.post(CONFIRM).status_code in (302, 403)
    assert readonly_client.post(CONFIRM, **_csrf(readonly_client)).status_code == 403
    assert admin_client.post(CONFIRM).status_code == 403  # no CSRF token
    assert _returns() == []

    response = admin_client.post(CONFIRM, **_csrf(admin_client))

    (run,) = _returns()
    assert response.status_code == 302
    assert response["Location"] == f"/updates/licensing/install/{run.pk}/"
    assert (run.version, run.from_version, run.state) == (OLD_VERSION, NEW_VERSION, "queued")
    assert run.details["returns_run"] == upgraded.pk and run.download_id == upgraded.download_id
    page = admin_client.get(response["Location"]).content.decode()
    assert "Convert the message store back while mail flows" in page  # the return's phases
    # One run at a time: a second return (or install) is refused while this one is queued.
    again = admin_client.post(CONFIRM, **_csrf(admin_client), follow=True)
    assert "already in progress" in again.content.decode() and len(_returns()) == 1


def test_the_api_starts_a_return_for_administrators_only(
    upgraded: InstallRun,  # noqa: F811
    client: Client,
    admin_token,
    viewer_token,
) -> None:
    assert client.post(API, **viewer_token).status_code == 403
    response = client.post(API, **admin_token)
    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["version"], body["from_version"], body["state"]) == (
        OLD_VERSION,
        NEW_VERSION,
        "queued",
    )
    assert body["phases"][0]["name"] == "Check the way back"
    refused = client.post(API, **admin_token)
    assert refused.status_code == 409 and "in progress" in refused.json()["detail"]


@pytest.mark.slow
def test_update_control_return_follows_the_return_to_its_end(
    upgraded: InstallRun,  # noqa: F811
    workers_on_mail,
    cli_in_this_process,
    capsys: pytest.CaptureFixture[str],
    admin_client: Client,
) -> None:
    workers_on_mail()

    code, out, err = update_control(capsys, "--return", "-q")

    assert code == 0, (out, err)
    assert f"Returning to firmware {OLD_VERSION} from {NEW_VERSION}" in out
    assert "[PASS] The way back:" in out
    assert f"Return complete: firmware {OLD_VERSION} (mail was held for" in out
    (run,) = _returns()
    assert run.state == InstallState.SUCCEEDED
    page = admin_client.get(f"/updates/licensing/install/{run.pk}/").content.decode()
    assert f"Return complete: firmware {OLD_VERSION}" in page
    assert "Upgrade complete" not in page
    code, out, _ = update_control(capsys, "--return")
    assert code == 3 and "Nothing to return to" in out
