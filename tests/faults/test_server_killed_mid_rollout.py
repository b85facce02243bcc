"""Fault: the server is SIGKILLed in the middle of a rollout and started again."""

from __future__ import annotations

import signal

import pytest

from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


@pytest.fixture
def fleet3(live_fleet):
    live_fleet.seed([f"node-{i}" for i in (1, 2, 3)])
    server = live_fleet.start_server(RM_UPDATE_TIMEOUT="20")
    # A slow service manager (1 s RestartSec) leaves a wide window in which a host is "restarting".
    live_fleet.start_agents(restart_sec=1.0)
    return server, live_fleet.api(), live_fleet.host_ids


def job_phases(api, host_id):
    return [j["phase"] for j in api.jobs(host_id)]


def dispatch_count(api):
    return api.audit_actions().count("host.update_dispatched")


def test_a_rollout_resumes_after_a_kill_while_a_host_restarts_without_a_duplicate_dispatch(fleet3):
    server, api, ids = fleet3
    wait_until(lambda: api.all_online(ids), 30, what="agents online")
    r = api.post_json("/api/fleet/update")
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    wait_until(lambda: job_phases(api, ids[0])[:1] == ["restarting"], 20, 0.01, "node-1 restarting")
    server.stop(signal.SIGKILL)
    server.start()

    fu = wait_until(lambda: api.fleet_update_ended(fid), 90, 0.1, "the rollout to finish after the restart")
    assert fu["status"] == "succeeded", fu
    assert [h["status"] for h in fu["hosts"]] == ["succeeded"] * 3
    for i in ids:
        jobs = api.jobs(i)
        assert [j["status"] for j in jobs] == ["succeeded"]  # exactly one job per host
    assert dispatch_count(api) == 3


def test_a_kill_mid_download_halts_the_rollout_cleanly_and_nothing_stays_running(fleet3, tmp_path):
    server, api, ids = fleet3
    server.stop()
    server.env["RM_DOWNLOAD_RATE_KIB"] = "32"  # a slow link, so the kill lands mid-body
    server.start()
    wait_until(lambda: api.all_online(ids), 30, what="agents online")
    fid = api.post_json("/api/fleet/update").json()["fleet_update"]["id"]
    wait_until(lambda: job_phases(api, ids[0])[:1] == ["downloading"], 20, 0.01, "node-1 downloading")
    server.stop(signal.SIGKILL)
    server.start()

    fu = wait_until(lambda: api.fleet_update_ended(fid), 60, 0.1, "the rollout to end")
    assert fu["status"] == "halted"
    assert [h["status"] for h in fu["hosts"]] == ["failed", "pending", "pending"]
    assert "node-1" in fu["halt_reason"]
    jobs = api.jobs(ids[0])
    assert len(jobs) == 1 and jobs[0]["status"] == "failed" and jobs[0]["error"]
    assert dispatch_count(api) == 1
    wait_until(lambda: api.all_online(ids), 30, what="agents back online")
    hosts = [api.host(i) for i in ids]
    assert [h["agent_version"] for h in hosts] == [A, A, A]
