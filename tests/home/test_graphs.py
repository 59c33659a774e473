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


def received_since(since: int, until: int | None = None) -> int:
    with msgstore.connect(readonly=True) as conn:
        (received,) = conn.execute(
            "SELECT SUM(received) FROM processing_minute WHERE minute >= ? AND minute < ?",
            (since, until or 2**40),
        ).fetchone()
    return int(received or 0)


def test_the_mail_graph_counts_messages_per_interval_that_add_up_to_the_window(demo_appliance):
    now = time.time()
    rng = graphs.RANGES["24h"]
    starts = graphs.bucket_starts(rng, now)
    received = received_since(starts[0])

    mail = graphs.mail_graph(rng, now)
    counts = {line.label: line.values for line in mail.series}
    totals = {t.range.key: t for t in graphs.window_totals(now)}

    assert received > 0
    assert [line.label for line in mail.series][:4] == ["Messages", "Spam", "Virus", "Rejected"]
    # Counts per bucket, not per minute: the bars add up to the messages of the window.
    assert sum(counts["Messages"]) == received == totals["24h"].received
    assert counts["Messages"][-2] == received_since(starts[-2], starts[-1])
    assert sum(counts["Virus"]) == totals["24h"].virus
    assert all(float(v).is_integer() for v in counts["Spam"])
    assert mail.series[0].summary == f"{received:,} in the last 24 hours"
    assert totals["1h"].received <= totals["24h"].received <= totals["30d"].received


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (170633, "166.6 KB"),
        (5 * 1024**2 + 1024**2 // 2, "5.5 MB"),
        (3 * 1024**3, "3.0 GB"),
        (2 * 1024**4, "2.0 TB"),
    ],
)
def test_bytes_read_in_human_units(value, text):
    assert graphs.human_bytes(value) == text


def test_the_totals_table_has_a_row_per_figure_and_a_column_per_range():
    totals = [
        graphs.WindowTotals(rng, 1234, 600, 3, 40, 2 * 1024**3) for rng in graphs.RANGES.values()
    ]
    panel = graphs.Graphs(graphs.RANGES["24h"], [], "", totals)

    rows = dict(panel.totals_rows)

    assert rows["Messages"] == ["1,234"] * 4
    assert rows["Virus"] == ["3"] * 4
    assert rows["Data received"] == ["2.0 GB"] * 4


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
        "resources", "CPU", [0, 60, 120, 180, 240],
        [graphs.Series("CPU", "s-cpu", [10.0, 20.0, None, 30.0, 40.0], "average 25%", "percent")],
        fixed_max=100.0,
    )  # fmt: skip

    svg = str(charts.render(graph))

    assert svg.count("<polyline") == 2
    assert 'aria-label="CPU: CPU: average 25%"' in svg
    assert ">100%<" in svg and ">00:00<" in svg
    assert "<title>00:02 UTC: CPU not measured</title>" in svg


def test_every_interval_has_a_tooltip_with_each_panels_figure():
    graph = graphs.Graph(
        "messages", "Mail", [0, 300, 600],
        [
            graphs.Series("Messages", "s-received", [3.0, 0.0, 1200.0]),
            graphs.Series("Virus", "s-virus", [1.0, 0.0, 0.0]),
            graphs.Series("Data received", "s-bytes", [0.0, 0.0, 3 * 1024**2], unit="bytes"),
        ],
        bucket_seconds=300,
    )  # fmt: skip

    svg = str(charts.render(graph))

    assert svg.count("<title>") == 3
    assert "<title>00:10-00:15 UTC: Messages 1,200; Virus 0; Data received 3.0 MB</title>" in svg
    assert svg.count('<path class="bar') == 3  # one path per panel, its bars as subpaths
    assert ">5 MB<" in svg  # the bytes axis in round bytes units, not 5.24M


def test_chart_labels_are_escaped():
    graph = graphs.Graph("x", "<b>", [0, 60], [graphs.Series("<i>", "s-cpu", [1.0, 2.0])])

    assert "<b>" not in str(charts.render(graph))


def test_home_shows_the_graphs_and_the_partial_switches_range(admin_client, demo_appliance):
    home = admin_client.get("/home/").content.decode()
    assert 'data-testid="chart-messages"' in home
    assert 'data-testid="chart-resources"' in home

    assert home.count("css/charts.css") == 1  # the partial links its styles on a full page...
    assert 'data-testid="graph-totals"' in home

    partial = admin_client.get("/home/graphs/?range=30d", headers={"HX-Request": "true"})
    assert partial.status_code == 200
    assert b"<html" not in partial.content
    assert b"charts.css" not in partial.content  # ...but not again on each htmx refresh
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
    by_hour = graphs.mail_graph(rng, now).series[0].values

    assert by_hour[-2] == received_since(starts[-2], starts[-1])
