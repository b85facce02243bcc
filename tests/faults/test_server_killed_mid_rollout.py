"""Fault: the server is SIGKILLed in the middle of a rollout and started again."""

from __future__ import annotations

import signal

import pytest

from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


def start_fleet3(live_fleet, **server_env):
    """Three hosts, the server (``RM_UPDATE_TIMEOUT=20`` plus ``server_env``) and their agents."""
    live_fleet.seed([f"node-{i}" for i in (1, 2, 3)])
    server = live_fleet.start_server(RM_UPDATE_TIMEOUT="20", **server_env)
    # A slow service manager (1 s RestartSec) leaves a wide window in which node-1 is "restarting";
    # the others restart at once (their restarts are not what these tests kill the server in).
    live_fleet.start_agent(live_fleet.tokens[0], restart_sec=1.0)
    for token in live_fleet.tokens[1:]:
        live_fleet.start_agent(token)
    return server, live_fleet.api(), live_fleet.host_ids


@pytest.fixture
def fleet3(live_fleet):
    return start_fleet3(live_fleet)


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


def test_a_kill_mid_download_halts_the_rollout_cleanly_and_nothing_stays_running(live_fleet):
    server, api, ids = start_fleet3(live_fleet, RM_DOWNLOAD_RATE_KIB="32")  # a slow link: the kill lands mid-body
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
