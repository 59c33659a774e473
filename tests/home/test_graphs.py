"""Processing graphs: few points at any range, sums that match the figures, gaps shown as gaps."""

from __future__ import annotations

import time

import pytest

from appliance.mail import msgstore
from home import charts, graphs, services
from home.models import ResourceSample

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("key", ["1h", "24h", "7d", "30d"])
def test_every_range_is_cut_into_at_most_a_few_hundred_aligned_buckets(key):
    rng = graphs.RANGES[key]
    starts = graphs.bucket_starts(rng, now=1_800_000_123)

    assert 50 <= len(starts) <= 400
    assert all(start % rng.bucket_seconds == 0 for start in starts)
    assert starts[-1] <= 1_800_000_123 < starts[-1] + rng.bucket_seconds


def test_mail_graphs_add_up_to_the_figures_in_the_message_store(demo_appliance):
    now = time.time()
    rng = graphs.RANGES["24h"]
    starts = graphs.bucket_starts(rng, now)
    with msgstore.connect(readonly=True) as conn:
        (received,) = conn.execute(
            "SELECT SUM(received) FROM processing_minute WHERE minute >= ?", (starts[0],)
        ).fetchone()

    messages = graphs.mail_graphs(rng, now)[0]
    per_bucket_minutes = rng.bucket_seconds / 60
    shown = sum(messages.series[0].values[:-1]) * per_bucket_minutes

    assert received > 0
    # The newest bucket is still filling and is shown per elapsed minute, so leave it out.
    newest = (messages.series[0].values[-1] or 0) * graphs._minutes_in(
        starts[-1], rng.bucket_seconds, now
    )
    assert shown + newest == pytest.approx(received)


def test_a_resource_sample_is_stored_once_per_minute_and_graphed(demo_appliance):
    first = services.resources_sample(now=1_800_000_000)
    again = services.resources_sample(now=1_800_000_030)

    assert first.minute == again.minute == 1_800_000_000 // 60 * 60
    assert ResourceSample.objects.count() == 1
    graph = graphs.resource_graph(graphs.RANGES["1h"], now=1_800_000_030)
    cpu = graph.series[0].values
    assert cpu[-1] == pytest.approx(again.cpu_percent)
    assert cpu[0] is None  # no sample an hour ago: a gap, not a zero


def test_samples_older_than_the_longest_range_are_dropped(demo_appliance):
    services.resources_sample(now=1_700_000_000)
    services.resources_sample(now=1_700_000_000 + 32 * 86400)

    assert ResourceSample.objects.count() == 1


def test_a_chart_breaks_its_line_at_gaps_and_labels_its_axes():
    graph = graphs.Graph(
        "resources", "CPU", "%", [0, 60, 120, 180, 240],
        [graphs.Series("CPU", "s-cpu", [10.0, 20.0, None, 30.0, 40.0])], fixed_max=100.0,
    )  # fmt: skip

    svg = str(charts.render(graph))

    assert svg.count("<polyline") == 2
    assert 'aria-label="CPU: CPU"' in svg
    assert ">100<" in svg and ">00:00<" in svg


def test_chart_labels_are_escaped():
    graph = graphs.Graph("x", "<b>", "", [0, 60], [graphs.Series("<i>", "s-cpu", [1.0, 2.0])])

    assert "<b>" not in str(charts.render(graph))


def test_home_shows_the_graphs_and_the_partial_switches_range(admin_client, demo_appliance):
    home = admin_client.get("/home/").content.decode()
    assert 'data-testid="chart-messages"' in home
    assert 'data-testid="chart-resources"' in home

    partial = admin_client.get("/home/graphs/?range=30d")
    assert partial.status_code == 200
    assert b"<html" not in partial.content
    assert partial.context["graph_panel"].range.key == "30d"
    for graph in partial.context["graph_panel"].graphs:
        assert len(graph.starts) == 360


def test_an_unknown_range_falls_back_to_24_hours(admin_client, demo_appliance):
    response = admin_client.get("/home/graphs/?range=forever")

    assert response.context["graph_panel"].range.key == "24h"


def test_without_a_message_store_the_resource_graph_still_shows(admin_client):
    response = admin_client.get("/home/graphs/")

    assert "Mail figures are not available" in response.content.decode()
    assert 'data-testid="chart-resources"' in response.content.decode()


def test_the_hourly_roll_up_agrees_with_the_minutes_after_a_replaced_sample(demo_appliance):
    from home.models import ResourceHour

    for offset in (0, 60, 61, 3600):
        services.resources_sample(now=1_800_000_000 + offset)

    for hour in ResourceHour.objects.all():
        minutes = ResourceSample.objects.filter(minute__gte=hour.hour, minute__lt=hour.hour + 3600)
        assert hour.samples == minutes.count()
        assert hour.cpu_sum == pytest.approx(sum(m.cpu_percent for m in minutes))
        assert hour.memory_sum == pytest.approx(sum(m.memory_percent for m in minutes))


def test_graphs_of_whole_hours_read_the_roll_ups_and_match_the_minutes(demo_appliance):
    now = time.time()
    rng = graphs.RANGES["7d"]
    starts = graphs.bucket_starts(rng, now)
    by_hour = graphs.mail_graphs(rng, now)[0].series[0].values
    with msgstore.connect(readonly=True) as conn:
        (received,) = conn.execute(
            "SELECT SUM(received) FROM processing_minute WHERE minute >= ? AND minute < ?",
            (starts[-2], starts[-1]),
        ).fetchone()

    assert by_hour[-2] * 60 == pytest.approx(received)
