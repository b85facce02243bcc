"""A fleet rollout over three real agents, the second of which is served a corrupt artifact."""

from __future__ import annotations

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.live import AgentProcess, ServerProcess, built_agent, seed_fleet, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


class Api:
    def __init__(self, base, token):
        import requests

        self.base = base
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def get(self, path):
        r = self.http.get(self.base + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path, body=None):
        return self.http.post(self.base + path, json=body or {}, timeout=10)


@pytest.fixture
def fleet(app, tmp_path, tmp_path_factory, database_url):
    ids, tokens, api_token = seed_fleet([f"node-{i}" for i in (1, 2, 3)])

    server = ServerProcess(str(tmp_path / "server"), database_url, B).start()
    proxy = FaultProxy(server.agent_port, mode="corrupt", after_bytes=1000).start()
    src = built_agent(A, str(tmp_path_factory.getbasetemp() / "agent-builds"))
    agents = []
    try:
        for i, token in enumerate(tokens):
            url = proxy.ws_url if i == 1 else server.agent_ws_url  # node-2 downloads through the bad link
            agents.append(AgentProcess(str(tmp_path / f"agent{i}"), src, url, token).start())
        api = Api(server.admin_url, api_token)
        wait_until(lambda: all(api.get(f"/api/hosts/{i}")["host"]["online"] for i in ids), 30, what="agents online")
        yield api, ids, agents, proxy
    finally:
        for a in agents:
            a.stop()
        proxy.stop()
        server.stop()


def rollout_done(api, fid):
    fu = api.get(f"/api/fleet-updates/{fid}")["fleet_update"]
    return fu if fu["status"] != "running" else None


def versions(api, ids):
    return [api.get(f"/api/hosts/{i}")["host"]["agent_version"] for i in ids]


def test_a_rollout_halts_at_the_bad_host_and_a_second_rollout_finishes_the_job(fleet):
    api, ids, agents, proxy = fleet
    r = api.post("/api/fleet/update")
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]

    fu = wait_until(lambda: rollout_done(api, fid), 60, 0.05, "the rollout to end")
    assert fu["status"] == "halted"
    assert [h["status"] for h in fu["hosts"]] == ["succeeded", "failed", "pending"]
    assert "node-2" in fu["halt_reason"] and "sha256" in fu["halt_reason"]
    wait_until(lambda: versions(api, ids) == [B, A, A], 20, what="node-1 at B, the others at A")
    with open(agents[1].program, "rb") as f, open(agents[2].program, "rb") as g:
        assert f.read() == g.read()  # node-2 still runs its old program, like untouched node-3
    alerts = api.get("/api/alerts?status=open")["alerts"]
    assert {a["kind"] for a in alerts} == {"fleet_update_halted", "update_failed"}
    actions = [e["action"] for e in api.get("/api/audit?limit=200")["events"]]
    for action in (
        "fleet.update_started",
        "host.update_dispatched",
        "host.update_succeeded",
        "host.update_failed",
        "fleet.update_halted",
    ):
        assert action in actions

    proxy.set_mode("pass")  # the artifact is fixed
    r = api.post("/api/fleet/update")
    assert r.status_code == 201, r.text
    fid2 = r.json()["fleet_update"]["id"]
    fu2 = wait_until(lambda: rollout_done(api, fid2), 60, 0.05, "the second rollout to end")
    assert fu2["status"] == "succeeded", fu2
    assert [h["name"] for h in fu2["hosts"]] == ["node-2", "node-3"]  # only the hosts still behind
    assert versions(api, ids) == [B, B, B]
    assert api.get("/api/alerts?status=open")["alerts"] == []
    assert "fleet.update_succeeded" in [e["action"] for e in api.get("/api/audit?limit=200")["events"]]
