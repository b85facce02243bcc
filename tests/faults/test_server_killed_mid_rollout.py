"""Fault: the server is SIGKILLed in the middle of a rollout and started again."""

from __future__ import annotations

import signal

import pytest
import requests

from tests.support.live import AgentProcess, ServerProcess, built_agent, seed_fleet, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


@pytest.fixture
def fleet3(app, tmp_path, tmp_path_factory, database_url):
    ids, tokens, api_token = seed_fleet([f"node-{i}" for i in (1, 2, 3)])
    server = ServerProcess(str(tmp_path / "server"), database_url, B, extra_env={"RM_UPDATE_TIMEOUT": "20"})
    server.start()
    src = built_agent(A, str(tmp_path_factory.getbasetemp() / "agent-builds"))
    # A slow service manager (1 s RestartSec) leaves a wide window in which a host is "restarting".
    agents = [
        AgentProcess(str(tmp_path / f"agent{i}"), src, server.agent_ws_url, token, restart_sec=1.0).start()
        for i, token in enumerate(tokens)
    ]
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_token}"
    try:
        yield server, http, ids
    finally:
        for a in agents:
            a.stop()
        server.stop()


def api(server, http, path, method="get", **kw):
    r = getattr(http, method)(server.admin_url + path, timeout=10, **kw)
    return r


def all_online(server, http, ids):
    return all(api(server, http, f"/api/hosts/{i}").json()["host"]["online"] for i in ids)


def job_phases(server, http, host_id):
    return [j["phase"] for j in api(server, http, f"/api/hosts/{host_id}/jobs").json()["jobs"]]


def dispatch_count(server, http):
    events = api(server, http, "/api/audit?limit=500").json()["events"]
    return sum(e["action"] == "host.update_dispatched" for e in events)


def test_a_rollout_resumes_after_a_kill_while_a_host_restarts_without_a_duplicate_dispatch(fleet3):
    server, http, ids = fleet3
    wait_until(lambda: all_online(server, http, ids), 30, what="agents online")
    r = api(server, http, "/api/fleet/update", "post", json={})
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    wait_until(lambda: job_phases(server, http, ids[0])[:1] == ["restarting"], 20, 0.01, "node-1 restarting")
    server.stop(signal.SIGKILL)
    server.start()

    def finished():
        fu = api(server, http, f"/api/fleet-updates/{fid}").json()["fleet_update"]
        return fu if fu["status"] != "running" else None

    fu = wait_until(finished, 90, 0.1, "the rollout to finish after the restart")
    assert fu["status"] == "succeeded", fu
    assert [h["status"] for h in fu["hosts"]] == ["succeeded"] * 3
    for i in ids:
        jobs = api(server, http, f"/api/hosts/{i}/jobs").json()["jobs"]
        assert [j["status"] for j in jobs] == ["succeeded"]  # exactly one job per host
    assert dispatch_count(server, http) == 3


def test_a_kill_mid_download_halts_the_rollout_cleanly_and_nothing_stays_running(fleet3, tmp_path):
    server, http, ids = fleet3
    server.stop()
    server.env["RM_DOWNLOAD_RATE_KIB"] = "32"  # a slow link, so the kill lands mid-body
    server.start()
    wait_until(lambda: all_online(server, http, ids), 30, what="agents online")
    fid = api(server, http, "/api/fleet/update", "post", json={}).json()["fleet_update"]["id"]
    wait_until(lambda: job_phases(server, http, ids[0])[:1] == ["downloading"], 20, 0.01, "node-1 downloading")
    server.stop(signal.SIGKILL)
    server.start()

    def finished():
        fu = api(server, http, f"/api/fleet-updates/{fid}").json()["fleet_update"]
        return fu if fu["status"] != "running" else None

    fu = wait_until(finished, 60, 0.1, "the rollout to end")
    assert fu["status"] == "halted"
    assert [h["status"] for h in fu["hosts"]] == ["failed", "pending", "pending"]
    assert "node-1" in fu["halt_reason"]
    jobs = api(server, http, f"/api/hosts/{ids[0]}/jobs").json()["jobs"]
    assert len(jobs) == 1 and jobs[0]["status"] == "failed" and jobs[0]["error"]
    assert dispatch_count(server, http) == 1
    wait_until(lambda: all_online(server, http, ids), 30, what="agents back online")
    hosts = [api(server, http, f"/api/hosts/{i}").json()["host"] for i in ids]
    assert [h["agent_version"] for h in hosts] == [A, A, A]
