"""`manage.py init_appliance`: idempotent on every start, --force rebuilds."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from appliance.mail import msgstore
from appliance.system.facts import appliance_exists
from appliance.system.paths import layout
from events.models import Category, Event

pytestmark = pytest.mark.django_db


def _run(*args: str, **options: object) -> str:
    out = StringIO()
    call_command("init_appliance", *args, stdout=out, **options)
    return out.getvalue()


def test_it_creates_the_appliance_and_writes_one_event(appliance_root: Path) -> None:
    output = _run(messages=25)
    assert appliance_exists()
    assert msgstore.totals().messages == 25
    assert "2.8.0.0" in output and "25 messages" in output
    event = Event.objects.get()
    assert event.category == Category.SYSTEM
    assert event.details["messages"] == 25


def test_a_second_run_says_it_exists_and_changes_nothing(appliance_root: Path) -> None:
    _run(messages=10)
    marker = layout().firmware_release.stat().st_mtime_ns
    output = _run(messages=10)
    assert "already exists" in output
    assert layout().firmware_release.stat().st_mtime_ns == marker
    assert msgstore.totals().messages == 10
    assert Event.objects.count() == 1


def test_force_rebuilds_the_appliance(appliance_root: Path) -> None:
    _run(messages=10)
    (appliance_root / "stray.txt").write_text("x")
    output = _run("--force", "--messages", "15")
    assert "Created" in output
    assert not (appliance_root / "stray.txt").exists()
    assert msgstore.totals().messages == 15
    assert Event.objects.count() == 2
    assert Event.objects.latest("id").details["forced"] is True


def test_it_refuses_a_negative_message_count(appliance_root: Path) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        _run(messages=-1)
    assert not appliance_exists()
