"""The reclaim planner's arithmetic, with made-up distributions and disks."""

from __future__ import annotations

import pytest

from mailsecurity.planner import (
    DiskFigures,
    Lever,
    RetentionSource,
    disk_advice,
    plan_reclaim,
    retention_levers,
)

GB = 10**9


def source(key: str, days: int, per_day: list[int]) -> RetentionSource:
    return RetentionSource(key, key.title(), days, tuple(per_day))


def test_a_disk_already_half_free_needs_no_change():
    plan = plan_reclaim([source("spam", 30, [GB] * 30)], DiskFigures(total=100 * GB, free=60 * GB))

    assert plan.meets_target_now and plan.reachable
    assert plan.changes == ()
    assert plan.free_after == 60 * GB


def test_the_largest_data_is_shortened_first_and_only_as_far_as_needed():
    spam = source("spam", 30, [2 * GB] * 30)  # 60 GB, 58 GB of it above the one-day floor
    logs = source("smtp_log", 90, [GB // 10] * 90)  # 9 GB
    disk = DiskFigures(total=200 * GB, free=90 * GB)  # needs 10 GB more

    plan = plan_reclaim([logs, spam], disk)

    steps = {step.key: step for step in plan.steps}
    assert plan.reachable
    # Days 29, 28, 27, 26 and 25 go: 5 x 2 GB = 10 GB.
    assert steps["spam"].proposed_days == 25
    assert steps["spam"].bytes_freed == 10 * GB
    assert steps["smtp_log"].proposed_days == 90 and not steps["smtp_log"].changes
    assert plan.free_after == 100 * GB
    assert plan.free_percent_after == pytest.approx(50.0)


def test_when_one_source_reaches_its_floor_the_next_largest_follows():
    big = source("big", 10, [GB] * 10)  # 9 GB above the floor
    small = source("small", 10, [GB // 2] * 10)  # 4.5 GB above the floor
    disk = DiskFigures(total=100 * GB, free=39 * GB)  # needs 11 GB

    plan = plan_reclaim([small, big], disk)

    steps = {step.key: step for step in plan.steps}
    assert steps["big"].proposed_days == 1 and steps["big"].bytes_freed == 9 * GB
    assert steps["small"].proposed_days == 6 and steps["small"].bytes_freed == 2 * GB
    assert plan.reachable and plan.free_after == 50 * GB


def test_data_already_past_its_retention_and_free_pages_count_as_freed():
    # 30-day retention but 40 days of data: days 30-39 go with the next purge anyway.
    spam = source("spam", 30, [GB] * 40)
    disk = DiskFigures(total=100 * GB, free=35 * GB, store_free_pages=5 * GB)

    plan = plan_reclaim([spam], disk)

    step = plan.steps[0]
    assert step.already_expired == 10 * GB
    assert plan.reachable and not step.changes  # 35 + 5 + 10 = 50
    assert plan.free_after == 50 * GB


def test_when_even_the_floor_cannot_reach_the_target_it_says_so_with_the_figures():
    # The development machine's case: a 252 GB disk with 30% free, a small message store.
    spam = source("spam", 30, [10**8] * 30)  # 3 GB
    disk = DiskFigures(total=252 * GB, free=int(252 * GB * 0.30))

    plan = plan_reclaim([spam], disk)

    assert not plan.reachable and not plan.meets_target_now
    assert plan.steps[0].proposed_days == 1
    assert plan.free_at_floor == disk.free + 29 * 10**8
    assert plan.shortfall == 126 * GB - plan.free_at_floor
    assert plan.free_percent_at_floor == pytest.approx(100 * plan.free_at_floor / (252 * GB))


def test_retention_never_goes_below_the_floor_nor_gets_longer():
    short = source("short", 3, [GB] * 3)
    plan = plan_reclaim([short], DiskFigures(total=100 * GB, free=0), floor_days=2)

    assert plan.steps[0].proposed_days == 2
    assert plan.steps[0].bytes_freed == GB
    assert not plan.reachable
    with pytest.raises(ValueError):
        plan_reclaim([short], DiskFigures(total=100 * GB, free=0), floor_days=0)


def test_days_without_data_are_stepped_over_and_ties_do_not_depend_on_order():
    sparse = source("b", 20, [GB, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5 * GB])  # nothing after day 10
    twin = source("a", 20, [GB, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5 * GB])
    disk = DiskFigures(total=100 * GB, free=45 * GB)

    first = plan_reclaim([sparse, twin], disk)
    second = plan_reclaim([twin, sparse], disk)

    # Equal data: "a" goes first by key; it frees 5 GB at 10 days, which is enough.
    assert {s.key: s.proposed_days for s in first.steps} == {"a": 10, "b": 20}
    assert {s.key: s.proposed_days for s in second.steps} == {"a": 10, "b": 20}


def test_a_source_with_no_data_is_left_alone():
    empty = source("empty", 30, [])
    spam = source("spam", 30, [GB] * 30)

    plan = plan_reclaim([empty, spam], DiskFigures(total=100 * GB, free=48 * GB))

    steps = {step.key: step for step in plan.steps}
    assert steps["empty"].proposed_days == 30 and steps["empty"].bytes_freed == 0
    assert steps["spam"].proposed_days == 28


def test_each_retention_lever_frees_what_its_retention_at_one_day_would():
    spam = source("store:1", 30, [GB] * 40)  # 10 GB already past the 30 days
    logs = source("smtp_log", 90, [GB // 10] * 90)

    levers = retention_levers([spam, logs], free_pages=GB // 2, urls={"store": "/stores/"})

    assert [(lever.key, lever.bytes) for lever in levers] == [
        ("store:1", 39 * GB),
        ("smtp_log", 89 * (GB // 10)),
        ("free_pages", GB // 2),
    ]
    assert levers[0].url == "/stores/" and levers[1].url is None
    assert levers[0].how == "retention from 30 to 1 day, then purge"


def test_the_advice_adds_up_and_says_when_the_levers_are_enough():
    levers = [Lever("a", "A", 3 * GB, "x"), Lever("b", "B", 8 * GB, "y")]

    advice = disk_advice(
        total=100 * GB, used=85 * GB, free=10 * GB, reserved=5 * GB, required_percent=20,
        levers=levers,
    )  # fmt: skip

    assert advice.needed == 10 * GB
    assert [lever.key for lever in advice.levers] == ["b", "a"]  # largest first
    assert advice.levers_total == 11 * GB
    assert advice.enough and advice.still_short == 0
    assert advice.free_after == 21 * GB
    assert advice.used_plus_free + advice.reserved == advice.total


def test_the_advice_says_how_much_is_still_missing_when_all_levers_are_not_enough():
    advice = disk_advice(
        total=100 * GB, used=98 * GB, free=2 * GB, reserved=0, required_percent=50,
        levers=[Lever("a", "A", 5 * GB, "x")],
    )  # fmt: skip

    assert advice.needed == 48 * GB
    assert not advice.enough
    assert advice.still_short == 43 * GB
    assert advice.free_percent_after == pytest.approx(7.0)
