"""The run report of a rollout run by a real server process over real agents (built, started, restarted).

Every phase time comes from the agents' own progress reports, recorded by the watcher as they
arrive; the test checks that the report's numbers agree with each other and with the rollout.
"""

from __future__ import annotations

import csv
import io

import pytest

from app.updates.report import CSV_COLUMNS, PHASES
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_a_real_rollout_reports_each_hosts_phases_and_a_consistent_summary(live_fleet):
    live_fleet.seed(["node-1", "node-2", "node-3"])
    live_fleet.start_server(RM_UPDATE_TIMEOUT="30")
    live_fleet.start_agents()
    api, ids = live_fleet.api(), live_fleet.host_ids
    wait_until(lambda: api.all_online(ids), 30, what="agents online")
    r = api.post_json("/api/fleet/update")
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]

    # While it runs the report is partial (and never an error).
    partial = api.get_json(f"/api/fleet-updates/{fid}/report")["report"]
    assert partial["summary"]["total"] == 3

    fu = wait_until(lambda: api.fleet_update_ended(fid), 120, 0.1, "the rollout to finish")
    assert fu["status"] == "succeeded", fu
    rep = api.get_json(f"/api/fleet-updates/{fid}/report")["report"]
    s = rep["summary"]
    assert s["partial"] is False and s["counts"]["succeeded"] == 3 and s["failures"] == [] and s["waits"] == []
    for h in rep["hosts"]:
        assert h["outcome"] == "succeeded" and h["from_version"] == "1.0.0" and h["error"] is None
        assert [p["phase"] for p in h["phases"]] == list(PHASES), h  # every phase the agent went through
        assert all(p["duration_s"] is not None and p["duration_s"] >= 0 for p in h["phases"])
        # the phases tile the host's time from dispatch to finish
        assert abs(sum(p["duration_s"] for p in h["phases"]) - h["duration_s"]) < 0.01, h
        assert h["phases"][0]["started_at"] == h["dispatched_at"]
    durations = sorted(h["duration_s"] for h in rep["hosts"])
    assert s["duration_s"] == {"count": 3, "p50": durations[1], "p95": durations[2], "max": durations[2]}
    # one host at a time: each dispatch after the previous finish, all inside the wall time
    hosts = rep["hosts"]
    assert all(a["finished_at"] <= b["dispatched_at"] for a, b in zip(hosts, hosts[1:], strict=False))
    assert s["wall_time_s"] >= sum(durations) - 0.01

    r = api.http.get(f"{api.base}/api/fleet-updates/{fid}/report.csv", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [row["host"] for row in rows] == ["node-1", "node-2", "node-3"]
    assert all(float(row["restarting_s"]) >= 0 for row in rows)

    page = live_fleet.admin().http.get(f"{api.base}/settings/fleet-update/{fid}/report", timeout=10)
    assert page.status_code == 200 and page.text.count('class="bar bar-succeeded"') == 3
