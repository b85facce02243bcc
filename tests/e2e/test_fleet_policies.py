"""Rollout strategies over real agents and a real server process: a canary failure, a budget halt
and a retry of the failed hosts, the ``wait`` offline policy, and a server SIGKILL mid-wave.

A failing host is one whose agent downloads through a corrupting proxy: the artifact's sha256
does not match, the agent refuses it, keeps its program, and reports the failure.
"""

from __future__ import annotations

import signal

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

A, B = "1.0.0", "2.0.0"


def start_fleet(live_fleet, n, bad=(), restart_sec=None, **server_env):
    """``n`` hosts node-1..node-n, the server, and their agents (those in ``bad`` through a
    corrupting proxy; those in ``restart_sec`` restarted that many seconds after they exit)."""
    live_fleet.seed([f"node-{i}" for i in range(1, n + 1)])
    server = live_fleet.start_server(**{"RM_FLEET_TICK_S": "0.2", "RM_UPDATE_TIMEOUT": "30", **server_env})
    proxy = live_fleet.add(FaultProxy(server.agent_port, mode="corrupt", after_bytes=1000).start())
    agents = []
    for i, token in enumerate(live_fleet.tokens, start=1):
        kwargs = {"restart_sec": restart_sec[i]} if restart_sec and i in restart_sec else {}
        agents.append(live_fleet.start_agent(token, url=proxy.ws_url if i in bad else None, **kwargs))
    api, ids = live_fleet.api(), live_fleet.host_ids
    wait_until(lambda: api.all_online(ids), 60, what="agents online")
    return server, api, ids, agents, proxy


def versions(api, ids):
    return [api.host(i)["agent_version"] for i in ids]


def statuses(fu):
    return [h["status"] for h in fu["hosts"]]


def start(api, **body):
    r = api.post_json("/api/fleet/update", body)
    assert r.status_code == 201, r.text
    return r.json()["fleet_update"]["id"]


def test_a_failed_canary_halts_the_rollout_and_nothing_beyond_it_is_touched(live_fleet):
    server, api, ids, agents, proxy = start_fleet(live_fleet, 4, bad={1})
    plan = api.post_json("/api/fleet/plan", {"canary": 1, "max_in_flight": 3}).json()["plan"]
    assert [[h["name"] for h in w["hosts"]] for w in plan["waves"]] == [["node-1"], ["node-2", "node-3", "node-4"]]
    fid = start(api, canary=1, canary_soak_s=1, max_in_flight=3)

    fu = wait_until(lambda: api.fleet_update_ended(fid), 90, 0.1, "the rollout to end")
    assert fu["status"] == "halted" and "node-1" in fu["halt_reason"] and "sha256" in fu["halt_reason"]
    assert statuses(fu) == ["failed", "pending", "pending", "pending"]
    assert api.audit_actions().count("host.update_dispatched") == 1  # only the canary
    assert all(api.jobs(i) == [] for i in ids[1:])
    assert versions(api, ids) == [A, A, A, A]
    assert "fleet_update_halted" in {a["kind"] for a in api.open_alerts()}


def test_a_budget_halt_lets_in_flight_hosts_finish_and_a_retry_updates_the_failed_ones(live_fleet):
    server, api, ids, agents, proxy = start_fleet(live_fleet, 6, bad={1, 2})
    fid = start(api, max_in_flight=3, max_failures=1)

    fu = wait_until(lambda: api.fleet_update_ended(fid), 90, 0.1, "the rollout to end")
    assert fu["status"] == "halted", fu
    assert fu["halt_reason"].startswith("2 hosts failed, over the failure budget of 1 (max_failures 1)")
    # Hosts in flight at the halt finish; nothing is dispatched after it.
    fu = wait_until(lambda: "running" not in statuses(f := api.fleet_update(fid)) and f, 60, 0.1, "in-flight hosts")
    assert statuses(fu)[:2] == ["failed", "failed"] and statuses(fu)[-2:] == ["pending", "pending"]
    assert set(statuses(fu)[2:]) <= {"succeeded", "pending"} and statuses(fu)[2] == "succeeded"
    started = sum(s != "pending" for s in statuses(fu))
    assert api.audit_actions().count("host.update_dispatched") == started  # at most 3 + the one a failure freed
    actions = api.audit_actions()
    assert "fleet.update_halted" in actions and "fleet_update_halted" in {a["kind"] for a in api.open_alerts()}

    proxy.set_mode("pass")  # the bad link is fixed
    r = api.post_json(f"/api/fleet-updates/{fid}/retry")
    assert r.status_code == 201, r.text
    retry = r.json()["fleet_update"]
    assert retry["kind"] == "retry" and retry["parent_id"] == fid
    assert [h["name"] for h in retry["hosts"]] == ["node-1", "node-2"]
    assert (retry["max_in_flight"], retry["max_failures"]) == ("3", "1")
    fu = wait_until(lambda: api.fleet_update_ended(retry["id"]), 90, 0.1, "the retry to end")
    assert fu["status"] == "succeeded" and statuses(fu) == ["succeeded", "succeeded"]
    wait_until(lambda: versions(api, ids)[:3] == [B, B, B], 30, what="node-1..3 at B")
    assert versions(api, ids)[-2:] == [A, A]  # the retry took only the failed hosts


def test_offline_wait_updates_a_host_that_comes_back_in_time(live_fleet):
    server, api, ids, agents, proxy = start_fleet(live_fleet, 3)
    agents[1].stop()  # node-2 goes away
    wait_until(lambda: not api.host(ids[1])["online"], 30, what="node-2 offline")
    plan = api.post_json("/api/fleet/plan", {"offline": "wait", "offline_deadline_s": 120}).json()["plan"]
    assert [h["name"] for h in plan["hosts"]] == ["node-1", "node-2", "node-3"]
    assert "offline=wait" in plan["hosts"][1]["note"]
    fid = start(api, offline="wait", offline_deadline_s=120)

    def others_done():
        fu = api.fleet_update(fid)
        return fu if [fu["hosts"][0]["status"], fu["hosts"][2]["status"]] == ["succeeded", "succeeded"] else None

    fu = wait_until(others_done, 90, 0.1, "node-1 and node-3 updated past the offline node-2")
    assert fu["status"] == "running" and fu["hosts"][1]["status"] == "pending"
    assert fu["hosts"][1]["waiting_since"] is not None
    agents[1].start()  # node-2 comes back
    fu = wait_until(lambda: api.fleet_update_ended(fid), 90, 0.1, "the rollout to end")
    assert fu["status"] == "succeeded" and statuses(fu) == ["succeeded"] * 3
    wait_until(lambda: versions(api, ids) == [B, B, B], 30, what="every host at B")


def test_a_server_killed_mid_wave_resumes_with_no_host_dispatched_twice(live_fleet):
    # node-1 and node-2 (wave 0) restart slowly: the kill lands while both are in flight. The jobs
    # get a deadline far beyond the restart (a loaded machine takes long to start a server): a
    # timeout here would be the machine's, not the resume's.
    server, api, ids, agents, proxy = start_fleet(live_fleet, 4, restart_sec={1: 1.5, 2: 1.5}, RM_UPDATE_TIMEOUT="150")
    fid = start(api, max_in_flight=2)

    def wave0_restarting():
        return all([j["phase"] for j in api.jobs(i)][:1] == ["restarting"] for i in ids[:2])

    wait_until(wave0_restarting, 60, 0.01, "node-1 and node-2 restarting")
    assert api.fleet_update(fid)["hosts"][2]["status"] == "pending"
    server.stop(signal.SIGKILL)
    server.start()

    fu = wait_until(lambda: api.fleet_update_ended(fid), 120, 0.1, "the rollout to finish after the restart")
    assert fu["status"] == "succeeded", fu
    assert statuses(fu) == ["succeeded"] * 4 and [h["wave"] for h in fu["hosts"]] == [0, 0, 1, 1]
    for i in ids:
        assert [j["status"] for j in api.jobs(i)] == ["succeeded"]  # exactly one job per host
    assert api.audit_actions().count("host.update_dispatched") == 4
