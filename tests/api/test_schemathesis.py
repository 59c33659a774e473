"""Schemathesis against /api/v1/openapi.json as an administrator: no 5xx, no status code the
description does not list, bodies and content types that match it (issue 13).

A bounded, reproducible run: every operation gets a few valid inputs and, when it takes any,
a few invalid ones, each derandomized, with no example database. The calls go through Django's
WSGI handler in this process, inside the test's transaction, to a licensed demo appliance whose
update feed offers a firmware. No worker runs anything the fuzzer asked for: services enqueue on
commit, the test's transaction never commits, and lmi.celery.enqueue only records here.

Schemathesis's own pytest integration (``schema.parametrize()``) is not used: on pytest 9.2
its items all share one node id, which pytest-xdist cannot schedule. The cases come from its
public strategy, ``APIOperation.as_strategy``, and are checked by its checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.services import api_token_create
from api.api import api
from appliance.firmware import license as appliance_license
from backups import services as backup_services
from backups import system_image
from lmi import celery as lmi_celery
from tests.upgrades import bundles
from tests.upgrades.conftest import issue_license
from upgrades import services
from upgrades.models import CheckTrigger, Download, DownloadState, DownloadTrigger, InstallRun

DESCRIPTION = "/api/v1/openapi.json"
EXAMPLES_PER_OPERATION = 25

# Operations the fuzzer never calls: each would destroy or replace what the appliance holds, or
# take it (or a cluster member) out of service. The method and the pattern also leave out a new
# operation of the same kind without anyone remembering to list it here.
DESTRUCTIVE_METHODS = ["DELETE"]  # backups_api_config_delete, cluster_api_member_remove
DESTRUCTIVE_OPERATIONS = [
    "backups_api_config_restore",  # replaces the appliance's configuration with a snapshot
    "backups_api_system_restore",  # replaces the whole system from a system backup
    "upgrades_api_install_start",  # installs firmware: stops mail, reboots into the new one
    "cluster_api_upgrade",  # a rolling firmware install across the cluster's members
]
DESTRUCTIVE_PATTERN = r"(restore|install_start|upgrade$|purge|reboot|shutdown|remove|delete)"

CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {
            # The administrator's token goes with every call; generated credentials would only
            # meet the 401 that test_api.py covers.
            "with-security-parameters": False,
        },
    }
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _description() -> dict[str, Any]:
    """The description /api/v1/openapi.json serves (its view returns exactly this)."""
    return api.get_openapi_schema(path_prefix=DESCRIPTION.removesuffix("/openapi.json"))


schema = (
    schemathesis.openapi.from_dict(_description(), config=CONFIG)
    .exclude(method=DESTRUCTIVE_METHODS)
    .exclude(operation_id=DESTRUCTIVE_OPERATIONS)
    .exclude(operation_id_regex=DESTRUCTIVE_PATTERN)
)
OPERATIONS = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def _path_parameters(label: str) -> set[str]:
    definition = OPERATIONS[label].definition.raw
    return {p["name"] for p in definition.get("parameters", []) if p["in"] == "path"}


def _takes_invalid_input(label: str) -> bool:
    """Whether some input of the operation can break its description: a query parameter, a
    body, a typed path parameter. Any text fits a plain text path parameter (``{name}``)."""
    definition = OPERATIONS[label].definition.raw
    return "requestBody" in definition or any(
        parameter["in"] != "path" or parameter["schema"].get("type") != "string"
        for parameter in definition.get("parameters", [])
    )


# Path parameters the known_path_parameters fixture gives a value naming something that exists:
# generated ones almost never do, and would leave the operation's 200 untried.
KNOWN_PATH_PARAMETERS = {"name", "job_id", "run_id"}

# Runs that fail for a cause outside what this change may touch; each is reported in issue 13.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# positive: inputs the description allows; negative: inputs it does not; known: positive, with
# the path naming a configuration backup, a system backup job or an install run that exists.
RUNS = [
    pytest.param(
        label,
        kind,
        id=f"{label} {kind}",
        marks=[pytest.mark.xfail(reason=KNOWN_FAILURES[label, kind])]
        if (label, kind) in KNOWN_FAILURES
        else [],
    )
    for label in OPERATIONS
    for kind in ("positive", "negative", "known")
    if kind == "positive"
    or (kind == "negative" and _takes_invalid_input(label))
    or (kind == "known" and _path_parameters(label) & KNOWN_PATH_PARAMETERS)
]


@pytest.fixture
def wsgi_app() -> Iterator[WSGIHandler]:
    """Django's WSGI handler, minus the connection closing it does around each request.

    At the end of a request Django closes a connection that is not in autocommit, which the
    test's transaction is not; Django's test client disconnects the same receiver.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield WSGIHandler()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def handed_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tasks the calls hand to the worker: recorded, never sent."""
    sent: list[str] = []

    def enqueue(task: str, *args: object, countdown: float | None = None) -> None:
        sent.append(task)

    monkeypatch.setattr(lmi_celery, "enqueue", enqueue)
    return sent


@pytest.fixture
def admin_bearer(admin_user) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token_create(admin_user, 'schemathesis')}"}


@pytest.fixture
def appliance_with_an_offer(demo_appliance: Path, tmp_path: Path, settings) -> Path:
    """The demo appliance, licensed, its feed checked and offering firmware 2.8.1.0: the update
    operations then answer as on a real appliance, not only "the feed is unreachable" (502)."""
    vendor = bundles.new_vendor()
    settings.TRUSTED_KEYS = [vendor.public_b64]
    appliance_license.install_license(issue_license(vendor))
    feed = tmp_path / "feed"
    feed.mkdir()
    bundle = bundles.build(vendor, feed / "lmi-firmware-2.8.1.0.bundle", payload_bytes=64 * 1024)
    bundles.write_feed(feed, (bundle, "2.8.1.0", "2.8.0.0"))
    settings.UPDATE_FEED_URL = str(feed)
    assert services.update_check(trigger=CheckTrigger.API).ok
    return demo_appliance


@pytest.fixture
def known_path_parameters(appliance_with_an_offer: Path, admin_user) -> dict[str, object]:
    """A configuration backup, a system backup job and a queued install run that exist, by
    their path parameters (nothing runs them: they are enqueued on a commit that never comes)."""
    backup = backup_services.config_backup_create(user=admin_user, comment="before fuzzing")
    job = system_image.system_backup_start(user=admin_user)
    download = Download.objects.create(
        version="2.8.1.0", url="http://127.0.0.1/x.bundle", size=1, sha256="0" * 64,
        state=DownloadState.READY, trigger=DownloadTrigger.USER,
    )  # fmt: skip
    run = InstallRun.objects.create(download=download, version="2.8.1.0", from_version="2.8.0.0")
    return {"name": backup.name, "job_id": job.pk, "run_id": run.pk}


def test_the_run_leaves_out_only_the_destructive_operations() -> None:
    # A new operation the patterns leave out is seen here, and listed (or the patterns fixed).
    described = {
        operation["operationId"]
        for operations in _description()["paths"].values()
        for operation in operations.values()
    }
    fuzzed = {operation.definition.raw["operationId"] for operation in OPERATIONS.values()}

    assert described - fuzzed == {
        *DESTRUCTIVE_OPERATIONS,
        "backups_api_config_delete",
        "cluster_api_member_remove",
    }


@pytest.mark.parametrize(("label", "kind"), RUNS)
@pytest.mark.usefixtures("handed_to_the_worker")
def test_the_api_keeps_to_its_description(
    label: str,
    kind: str,
    wsgi_app: WSGIHandler,
    admin_bearer: dict[str, str],
    known_path_parameters: dict[str, object],
) -> None:
    operation = OPERATIONS[label]
    if kind == "known":
        cases = operation.as_strategy(
            path_parameters={
                name: value
                for name, value in known_path_parameters.items()
                if name in _path_parameters(label)
            }
        )
    else:
        cases = operation.as_strategy(generation_mode=GenerationMode(kind))

    # Examples are not reset between cases (one appliance and one transaction per operation):
    # later cases meet what earlier ones made, as a client's calls would.
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    @hypothesis.given(case=cases)
    def call(case: Case) -> None:
        case.call_and_validate(app=wsgi_app, headers=admin_bearer, checks=CHECKS)

    call()
