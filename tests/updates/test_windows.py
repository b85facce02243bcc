"""Maintenance-window arithmetic (app/updates/windows.py): exact instants, DST change days included.

2026: Europe/Berlin springs forward on Sunday 29 March at 01:00 UTC (02:00 CET -> 03:00 CEST) and
falls back on Sunday 25 October at 01:00 UTC (03:00 CEST -> 02:00 CET); America/New_York springs
forward on Sunday 8 March at 07:00 UTC (02:00 EST -> 03:00 EDT) and falls back on Sunday
1 November at 06:00 UTC (02:00 EDT -> 01:00 EST).
"""

from __future__ import annotations

import datetime as dt

import pytest

from app.errors import Refusal
from app.updates.windows import Occurrence, Wait, Window, WindowError, gate

SUN = 6
SAT = 5
T = dt.datetime


def window(start, end, zone, days=(SUN,), labels=None, name="w"):
    return Window.parse(name, list(days), start, end, zone, labels or {})


def openings(w: Window, frm: dt.datetime, to: dt.datetime, step_s: int = 60) -> list[tuple[dt.datetime, dt.datetime]]:
    """Walk the instants minute by minute and record each closed->open->closed stretch."""
    out, t, opened = [], frm, None
    while t <= to:
        now_open = w.is_open(t)
        if now_open and opened is None:
            opened = t
        elif not now_open and opened is not None:
            out.append((opened, t))
            opened = None
        t += dt.timedelta(seconds=step_s)
    return out


# --- Europe/Berlin -----------------------------------------------------------------------------


def test_a_berlin_window_on_an_ordinary_sunday_is_two_hours_of_cet():
    w = window("02:00", "04:00", "Europe/Berlin")
    assert w.occurrence_on(dt.date(2026, 3, 22)) == Occurrence(T(2026, 3, 22, 1, 0), T(2026, 3, 22, 3, 0))


def test_on_the_spring_forward_day_a_window_starting_in_the_gap_opens_at_three_local():
    w = window("02:00", "04:00", "Europe/Berlin")
    # 02:00 does not exist that night: the window opens when the clocks jump to 03:00 CEST.
    assert w.occurrence_on(dt.date(2026, 3, 29)) == Occurrence(T(2026, 3, 29, 1, 0), T(2026, 3, 29, 2, 0))
    assert not w.is_open(T(2026, 3, 29, 0, 59))
    assert w.is_open(T(2026, 3, 29, 1, 0))
    assert w.is_open(T(2026, 3, 29, 1, 59))
    assert not w.is_open(T(2026, 3, 29, 2, 0))


def test_a_window_wholly_inside_the_skipped_hour_is_not_skipped():
    w = window("02:00", "02:30", "Europe/Berlin")
    assert w.occurrence_on(dt.date(2026, 3, 29)) == Occurrence(T(2026, 3, 29, 1, 0), T(2026, 3, 29, 1, 30))
    late = window("02:30", "03:00", "Europe/Berlin")
    assert late.occurrence_on(dt.date(2026, 3, 29)) == Occurrence(T(2026, 3, 29, 1, 0), T(2026, 3, 29, 1, 30))
    assert openings(w, T(2026, 3, 28, 12), T(2026, 3, 29, 12)) == [(T(2026, 3, 29, 1, 0), T(2026, 3, 29, 1, 30))]


def test_on_the_fall_back_day_the_window_opens_once_at_the_first_two_oclock_and_runs_through_the_repeat():
    w = window("02:00", "04:00", "Europe/Berlin")
    # 02:00 CEST = 00:00 UTC; 04:00 CET = 03:00 UTC: three real hours, one opening.
    assert w.occurrence_on(dt.date(2026, 10, 25)) == Occurrence(T(2026, 10, 25, 0, 0), T(2026, 10, 25, 3, 0))
    assert openings(w, T(2026, 10, 24, 12), T(2026, 10, 25, 12)) == [(T(2026, 10, 25, 0, 0), T(2026, 10, 25, 3, 0))]


def test_a_window_inside_the_repeated_hour_runs_only_in_its_first_pass():
    w = window("02:15", "02:45", "Europe/Berlin")
    assert w.occurrence_on(dt.date(2026, 10, 25)) == Occurrence(T(2026, 10, 25, 0, 15), T(2026, 10, 25, 0, 45))
    assert not w.is_open(T(2026, 10, 25, 1, 15))  # the second 02:15 (CET)
    assert len(openings(w, T(2026, 10, 24, 12), T(2026, 10, 25, 12))) == 1


def test_an_overnight_window_across_the_fall_back_closes_at_the_wall_time_on_the_next_day():
    w = window("22:00", "03:00", "Europe/Berlin", days=(SAT,))
    # Sat 22:00 CEST = 20:00 UTC; Sun 03:00 CET = 02:00 UTC.
    assert w.occurrence_on(dt.date(2026, 10, 24)) == Occurrence(T(2026, 10, 24, 20, 0), T(2026, 10, 25, 2, 0))
    assert w.is_open(T(2026, 10, 25, 1, 30))
    assert w.next_close(T(2026, 10, 25, 1, 30)) == T(2026, 10, 25, 2, 0)


# --- America/New_York --------------------------------------------------------------------------


def test_new_york_spring_forward_window_opens_at_three_edt():
    w = window("02:00", "04:00", "America/New_York")
    assert w.occurrence_on(dt.date(2026, 3, 1)) == Occurrence(T(2026, 3, 1, 7, 0), T(2026, 3, 1, 9, 0))
    assert w.occurrence_on(dt.date(2026, 3, 8)) == Occurrence(T(2026, 3, 8, 7, 0), T(2026, 3, 8, 8, 0))
    assert openings(w, T(2026, 3, 7, 12), T(2026, 3, 8, 12)) == [(T(2026, 3, 8, 7, 0), T(2026, 3, 8, 8, 0))]


def test_new_york_fall_back_window_opens_at_the_first_one_oclock_once():
    w = window("01:00", "03:00", "America/New_York")
    # 01:00 EDT = 05:00 UTC; 03:00 EST = 08:00 UTC.
    assert w.occurrence_on(dt.date(2026, 11, 1)) == Occurrence(T(2026, 11, 1, 5, 0), T(2026, 11, 1, 8, 0))
    assert openings(w, T(2026, 10, 31, 12), T(2026, 11, 1, 12)) == [(T(2026, 11, 1, 5, 0), T(2026, 11, 1, 8, 0))]
    short = window("01:30", "01:45", "America/New_York")
    assert short.occurrence_on(dt.date(2026, 11, 1)) == Occurrence(T(2026, 11, 1, 5, 30), T(2026, 11, 1, 5, 45))
    assert not short.is_open(T(2026, 11, 1, 6, 30))  # 01:30 EST, the repeat


def test_new_york_window_after_the_change_uses_the_new_offset():
    w = window("02:00", "04:00", "America/New_York")
    assert w.occurrence_on(dt.date(2026, 11, 1)) == Occurrence(T(2026, 11, 1, 7, 0), T(2026, 11, 1, 9, 0))


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("start,end", [("00:30", "03:30"), ("01:00", "02:00"), ("02:00", "03:00"), ("23:00", "01:00")])
def test_a_daily_window_opens_exactly_once_a_day_all_year(zone, start, end):
    w = window(start, end, zone, days=range(7))
    day = dt.date(2026, 1, 1)
    occurrences = [w.occurrence_on(day + dt.timedelta(days=i)) for i in range(365)]
    assert all(o is not None and o.closes > o.opens for o in occurrences)
    # Consecutive days never overlap or coincide: nothing is doubled.
    assert all(a.opens < b.opens for a, b in zip(occurrences, occurrences[1:], strict=False))
    assert len({o.opens for o in occurrences}) == 365


# --- next open / close, several windows, labels --------------------------------------------------


def test_next_open_and_close_across_the_week():
    w = window("02:00", "04:00", "UTC", days=(SAT, SUN))
    fri = T(2026, 11, 27, 12, 0)  # a Friday
    assert not w.is_open(fri)
    assert w.next_open(fri) == T(2026, 11, 28, 2, 0)
    assert w.next_close(fri) == T(2026, 11, 28, 4, 0)
    inside = T(2026, 11, 28, 3, 0)
    assert w.is_open(inside)
    assert w.next_close(inside) == T(2026, 11, 28, 4, 0)
    assert w.next_open(inside) == T(2026, 11, 29, 2, 0)


def test_end_at_midnight_and_24_00_and_a_whole_day():
    w = window("20:00", "24:00", "UTC", days=(0,))
    assert w.occurrence_on(dt.date(2026, 11, 30)) == Occurrence(T(2026, 11, 30, 20), T(2026, 12, 1, 0))
    day = window("06:00", "06:00", "UTC", days=(0,))
    assert day.occurrence_on(dt.date(2026, 11, 30)) == Occurrence(T(2026, 11, 30, 6), T(2026, 12, 1, 6))


def test_a_host_matched_by_several_windows_may_go_when_any_is_open():
    a = window("02:00", "04:00", "UTC", days=range(7), name="night", labels={"site": "fra"})
    b = window("12:00", "13:00", "UTC", days=range(7), name="noon", labels={})
    host = {"site": "fra", "role": "db"}
    assert gate([a, b], host, T(2026, 11, 30, 3, 0)) is None
    assert gate([a, b], host, T(2026, 11, 30, 12, 30)) is None
    assert gate([a, b], host, T(2026, 11, 30, 5, 0)) == Wait("noon", T(2026, 11, 30, 12, 0))
    assert gate([a, b], host, T(2026, 11, 30, 14, 0)) == Wait("night", T(2026, 12, 1, 2, 0))
    # A host the labelled window does not match only has the other.
    assert gate([a, b], {"site": "ams"}, T(2026, 11, 30, 14, 0)) == Wait("noon", T(2026, 12, 1, 12, 0))


def test_a_host_no_window_applies_to_is_not_restricted():
    a = window("02:00", "04:00", "UTC", labels={"site": "fra"})
    assert gate([a], {"site": "ams"}, T(2026, 11, 30, 12, 0)) is None
    assert gate([], {}, T(2026, 11, 30, 12, 0)) is None


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(days=[]), "days"),
        (dict(days=[7]), "days"),
        (dict(days=[1, 1]), "more than once"),
        (dict(days=[True]), "days"),
        (dict(days="sat"), "days"),
        (dict(start="2:00"), "start"),
        (dict(start="24:00"), "start"),
        (dict(end="04:60"), "end"),
        (dict(end=400), "end"),
        (dict(timezone="Mars/Olympus"), "not a known"),
        (dict(timezone="../etc/passwd"), "timezone"),
        (dict(timezone=""), "timezone"),
        (dict(name=""), "name"),
        (dict(name="x" * 101), "name"),
        (dict(name="a\x07b"), "control"),
    ],
)
def test_bad_fields_are_named(fields, message):
    base = dict(name="w", days=[SUN], start="02:00", end="04:00", timezone="Europe/Berlin", labels={})
    base.update(fields)
    with pytest.raises(WindowError, match=message):
        Window.parse(**base)


@pytest.mark.parametrize("labels", [["a"], {"a": 1}, {"": "x"}, None])
def test_bad_labels_are_refused_as_host_labels_are(labels):
    with pytest.raises(Refusal) as e:
        Window.parse("w", [SUN], "02:00", "04:00", "UTC", labels)
    assert e.value.code == "invalid_labels"
