"""The run report's arithmetic and shape, over rollouts written to the database at known times."""

from __future__ import annotations

import datetime as dt

import pytest

from app.errors import Refusal
from app.updates import report
from app.updates.report import failure_reason, percentile
from tests.support.rollouts import Line, seed_rollout

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)  # the FakeClock's start
PHASES = {"downloading": 1.0, "verifying": 4.0, "staging": 5.0, "restarting": 6.0}


def test_percentiles_are_nearest_rank_on_known_data():
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([4, 1, 3, 2], 50) == 2  # the 2nd of 4, sorted
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile(list(range(1, 101)), 100) == 100
    assert percentile([10, 20, 30], 95) == 30
    assert percentile([10, 20, 30], 1) == 10


def test_failure_reasons_group_what_only_differs_by_host_number_version_or_id():
    a = failure_reason("timed out after 90 s waiting for version 2.0.0", "web-1")
    b = failure_reason("timed out after 120 s waiting for version 2.0.1", "db-7")
    assert a == b == "timed out after <n> s waiting for version <version>"
    c = failure_reason("host web-1: sha256 mismatch for job 3f2a9c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f", "web-1")
    assert c == "host <host>: sha256 mismatch for job <id>"
    assert failure_reason("  disk\n full  ") == "disk full"
    assert failure_reason(None) == failure_reason("") == "no reason given"
    assert len(failure_reason("x" * 5000)) == report.MAX_REASON_CHARS
    # names inside other words are left alone
    assert failure_reason("web-10 is not web-1", "web-1") == "web-10 is not <host>"


def three_waves():
    return [
        Line("c-1", wave=0, dispatch_s=0, took_s=10, phases=PHASES),
        Line("w1-a", wave=1, dispatch_s=15, took_s=20, phases=PHASES),
        Line(
            "w1-b",
            wave=1,
            dispatch_s=15,
            took_s=30,
            outcome="failed",
            phases={"downloading": 1.0},
            error="timed out after 90 s waiting for version 2.0.0",
        ),
        Line(
            "w1-c",
            wave=1,
            dispatch_s=16,
            took_s=40,
            outcome="failed",
            phases={"downloading": 1.0},
            error="timed out after 91 s waiting for version 2.0.0",
        ),
        Line(
            "w2-a",
            wave=2,
            dispatch_s=60,
            took_s=5,
            outcome="failed",
            phases={},
            error="agent reported failed: host w2-a: no space left on device",
            wait_s=50,
        ),
        Line(
            "w2-b",
            wave=2,
            outcome="skipped",
            dispatch_s=None,
            took_s=60,
            wait_s=30,
            error="stayed offline past the 30 s deadline of offline=wait",
        ),
    ]


def test_a_finished_rollout_reports_each_host_and_the_summary(app):
    fid = seed_rollout(three_waves(), T0, status="halted", took_s=70, halt_reason="host w2-a: ...")
    data = report.build(fid).to_dict()
    hosts = {h["name"]: h for h in data["hosts"]}
    assert [h["name"] for h in data["hosts"]] == ["c-1", "w1-a", "w1-b", "w1-c", "w2-a", "w2-b"]

    c1 = hosts["c-1"]
    assert c1["dispatched_at"] == "2026-01-01T12:00:00Z" and c1["finished_at"] == "2026-01-01T12:00:10Z"
    assert c1["duration_s"] == 10.0 and c1["outcome"] == "succeeded" and c1["wave"] == 0
    assert [(p["phase"], p["duration_s"]) for p in c1["phases"]] == [
        ("dispatched", 1.0),
        ("downloading", 3.0),
        ("verifying", 1.0),
        ("staging", 1.0),
        ("restarting", 4.0),
    ]
    assert hosts["w2-a"]["phases"] == [{"phase": "dispatched", "started_at": "2026-01-01T12:01:00Z", "duration_s": 5.0}]
    assert hosts["w2-b"]["dispatched_at"] is None and hosts["w2-b"]["duration_s"] is None
    assert hosts["w1-b"]["reason"] == "timed out after <n> s waiting for version <version>"

    s = data["summary"]
    assert s["partial"] is False and s["total"] == 6 and s["wall_time_s"] == 70.0
    assert s["counts"]["succeeded"] == 2 and s["counts"]["failed"] == 3 and s["counts"]["skipped"] == 1
    # durations of the five dispatched hosts: 5, 10, 20, 30, 40
    assert s["duration_s"] == {"count": 5, "p50": 20.0, "p95": 40.0, "max": 40.0}
    assert s["failures"] == [
        {
            "reason": "timed out after <n> s waiting for version <version>",
            "count": 2,
            "hosts": ["w1-b", "w1-c"],
            "example": "timed out after 90 s waiting for version 2.0.0",
        },
        {
            "reason": "agent reported failed: host <host>: no space left on device",
            "count": 1,
            "hosts": ["w2-a"],
            "example": "agent reported failed: host w2-a: no space left on device",
        },
    ]
    assert s["waits"] == [
        {
            "host_id": hosts["w2-a"]["host_id"],
            "name": "w2-a",
            "reason": "offline",
            "window": None,
            "outcome": "failed",
            "since": "2026-01-01T12:00:50Z",
            "until": "2026-01-01T12:01:00Z",
            "waited_s": 10.0,
            "still_waiting": False,
        },
        {
            "host_id": hosts["w2-b"]["host_id"],
            "name": "w2-b",
            "reason": "offline",
            "window": None,
            "outcome": "skipped",
            "since": "2026-01-01T12:00:30Z",
            "until": "2026-01-01T12:01:00Z",
            "waited_s": 30.0,
            "still_waiting": False,
        },
    ]
    assert s["skipped"] == [
        {
            "reason": "stayed offline past the <n> s deadline of offline=wait",
            "count": 1,
            "hosts": ["w2-b"],
            "example": "stayed offline past the 30 s deadline of offline=wait",
        }
    ]
    assert [(w["wave"], w["hosts"], w["duration_s"]) for w in s["waves"]] == [(0, 1, 10.0), (1, 3, 41.0), (2, 2, 5.0)]
    assert data["fleet_update"]["status"] == "halted" and data["fleet_update"]["halt_reason"] == "host w2-a: ..."


def test_a_running_rollout_gives_a_partial_report_with_open_bars(app, clock):
    lines = [
        Line("done-1", dispatch_s=0, took_s=8, phases=PHASES),
        Line("busy-1", wave=1, dispatch_s=10, took_s=None, outcome="running", phases={"downloading": 2.0}),
        Line("next-1", wave=2, dispatch_s=None, outcome="pending", wait_s=12),
    ]
    fid = seed_rollout(lines, T0, status="running")
    clock.advance(20)
    data = report.build(fid).to_dict()
    busy = data["hosts"][1]
    assert busy["outcome"] == "running" and busy["finished_at"] is None and busy["duration_s"] is None
    assert [(p["phase"], p["duration_s"]) for p in busy["phases"]] == [("dispatched", 2.0), ("downloading", 8.0)]
    assert data["hosts"][2]["outcome"] == "waiting"
    s = data["summary"]
    assert s["partial"] is True and s["wall_time_s"] == 20.0
    assert s["counts"]["running"] == 1 and s["counts"]["waiting"] == 1 and s["counts"]["succeeded"] == 1
    assert s["duration_s"]["count"] == 1 and s["duration_s"]["max"] == 8.0
    assert s["waits"][0]["still_waiting"] is True and s["waits"][0]["waited_s"] == 8.0
    svg = report.build(fid).timeline_svg()
    assert svg.count('class="bar ') == 2 and 'data-outcome="running"' in svg


def test_a_rollout_from_before_phases_were_recorded_says_so(app):
    lines = [
        Line("old-1", took_s=9, phases=PHASES, record_phases=False),
        Line("old-2", took_s=7, outcome="failed", phases=PHASES, record_phases=False, error="boom"),
    ]
    fid = seed_rollout(lines, T0, status="halted", took_s=9)
    data = report.build(fid).to_dict()
    assert [h["phases"] for h in data["hosts"]] == [None, None]
    assert [h["duration_s"] for h in data["hosts"]] == [9.0, 7.0]
    row = report.build(fid).csv().splitlines()[1].split(",")
    header = list(report.CSV_COLUMNS)
    assert row[header.index("downloading_s")] == "" and row[header.index("duration_s")] == "9.0"


def test_an_unknown_rollout_is_a_typed_404(app):
    with pytest.raises(Refusal) as e:
        report.build(4242)
    assert (e.value.status, e.value.code) == (404, "fleet_update_not_found")


def test_the_timeline_draws_one_bar_per_dispatched_host_in_wave_bands(app):
    fid = seed_rollout(three_waves(), T0, status="halted", took_s=70)
    svg = str(report.build(fid).timeline_svg())
    assert svg.count('class="bar ') == 5  # w2-b was skipped: never dispatched, no bar
    assert svg.count('class="wave-band"') == 3 and svg.count('class="wave-rule"') == 2
    assert 'data-outcome="failed" data-wave="1" x="' in svg
    assert svg.count(f'fill="{report.COLOURS["failed"]}"') == 3
    assert svg.count('class="wait"') == 2  # w2-a before its dispatch, w2-b until it was skipped
    assert " style=" not in svg and "<style" not in svg and "<script" not in svg


def test_a_thousand_host_timeline_uses_thin_unnamed_rows(app):
    from tests.support.rollouts import big_rollout

    fid = big_rollout(1000, T0)
    rep = report.build(fid)
    svg = str(rep.timeline_svg())
    assert svg.count('class="bar ') == 1000 and 'class="host-label"' not in svg
    assert 'data-row-height="5"' in svg and svg.count('class="wave-band"') == 20
    assert rep.to_dict()["summary"]["counts"]["failed"] == 10
