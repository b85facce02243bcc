"""The run report's routes: JSON, CSV, the page; typed 404s; viewers read it; the CSP holds."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

import pytest

from app.security import CSP
from app.updates import report
from app.updates.fleet import start
from tests.support.rollouts import Line, seed_rollout

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
ODD_NAME = 'odd,"name"'
ODD_ERROR = '=cmd|"/c calc"!A1, then\nline two'


@pytest.fixture
def rollout(app, cast):
    lines = [
        Line("r-1", dispatch_s=0, took_s=10, phases={"downloading": 1.0, "restarting": 5.0}),
        Line(ODD_NAME, wave=1, dispatch_s=12, took_s=4, outcome="failed", error=ODD_ERROR),
        Line("r-3", wave=1, outcome="skipped", dispatch_s=None, took_s=12),
    ]
    return seed_rollout(lines, T0, status="halted", took_s=16, halt_reason=f"host {ODD_NAME}: boom")


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_a_viewer_token_reads_the_report_as_json(client, rollout, viewer_token):
    r = client.get(f"/api/fleet-updates/{rollout}/report", headers=bearer(viewer_token))
    assert r.status_code == 200 and r.mimetype == "application/json"
    rep = r.get_json()["report"]
    assert rep["fleet_update"]["id"] == rollout and rep["fleet_update"]["status"] == "halted"
    assert [h["name"] for h in rep["hosts"]] == ["r-1", ODD_NAME, "r-3"]
    assert [h["outcome"] for h in rep["hosts"]] == ["succeeded", "failed", "skipped"]
    assert rep["hosts"][0]["phases"][1] == {
        "phase": "downloading",
        "started_at": "2026-01-01T12:00:01Z",
        "duration_s": 4.0,
    }
    s = rep["summary"]
    assert s["duration_s"] == {"count": 2, "p50": 4.0, "p95": 10.0, "max": 10.0} and s["wall_time_s"] == 16.0
    assert s["failures"][0]["hosts"] == [ODD_NAME]


def test_the_csv_is_one_escaped_row_per_host_as_a_download(client, rollout, viewer_token):
    r = client.get(f"/api/fleet-updates/{rollout}/report.csv", headers=bearer(viewer_token))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert r.headers["Content-Disposition"] == f'attachment; filename="fleet-update-{rollout}-report.csv"'
    rows = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert rows[0] == list(report.CSV_COLUMNS)
    assert len(rows) == 4 and all(len(row) == len(rows[0]) for row in rows)
    col = {name: i for i, name in enumerate(rows[0])}
    odd = rows[2]
    assert odd[col["host"]] == ODD_NAME  # the comma and quotes survive the round trip
    assert odd[col["error"]] == "'" + ODD_ERROR  # the newline too; a formula is defused
    assert odd[col["outcome"]] == "failed" and odd[col["duration_s"]] == "4.0"
    assert rows[1][col["downloading_s"]] == "4.0" and rows[1][col["restarting_s"]] == "5.0"
    assert rows[3][col["dispatched_at"]] == "" and rows[3][col["outcome"]] == "skipped"


@pytest.mark.parametrize("suffix", ["report", "report.csv"])
def test_an_unknown_rollout_is_a_typed_404(client, cast, viewer_token, suffix):
    r = client.get(f"/api/fleet-updates/987654/{suffix}", headers=bearer(viewer_token))
    assert r.status_code == 404
    assert r.get_json()["error"]["code"] == "fleet_update_not_found"


def test_anonymous_callers_get_401_and_the_page_sends_them_to_log_in(client, rollout):
    assert client.get(f"/api/fleet-updates/{rollout}/report").status_code == 401
    assert client.get(f"/api/fleet-updates/{rollout}/report.csv").status_code == 401
    r = client.get(f"/settings/fleet-update/{rollout}/report")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_a_viewer_sees_the_page_with_its_timeline_and_no_inline_style(as_viewer, rollout):
    r = as_viewer.get(f"/settings/fleet-update/{rollout}/report")
    assert r.status_code == 200
    assert r.headers["Content-Security-Policy"] == CSP and "unsafe-inline" not in CSP
    html = r.get_data(as_text=True)
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="timeline"') == 1
    assert len(re.findall(r'class="bar bar-', html)) == 2
    assert not re.search(r"\sstyle\s*=", html) and "<style" not in html  # the CSP would drop both
    assert "odd,&#34;name&#34;" in html and ODD_NAME not in html  # escaped
    assert "p50 4.0 s · p95 10.0 s · max 10.0 s" in html
    assert f"/api/fleet-updates/{rollout}/report.csv" in html


def test_the_page_of_an_unknown_rollout_is_the_404_page(as_viewer):
    r = as_viewer.get("/settings/fleet-update/987654/report")
    assert r.status_code == 404 and "no fleet update with id 987654" in r.get_data(as_text=True)


def test_the_fleet_page_links_the_latest_rollout_and_the_history_to_their_reports(as_admin, cast, release):
    fid = start("admin", host_ids=[cast.host_behind.id]).id
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    assert f'href="/settings/fleet-update/{fid}/report" id="fleet-report-link"' in html
    assert html.count(f'href="/settings/fleet-update/{fid}/report"') == 2  # the card and the history row
    r = as_admin.get(f"/settings/fleet-update/{fid}/report")
    assert r.status_code == 200 and 'id="report-partial"' in r.get_data(as_text=True)  # still running
