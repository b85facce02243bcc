"""A fleet rollout over three real agents, the second of which is served a corrupt artifact."""

from __future__ import annotations

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


@pytest.fixture
def fleet(live_fleet):
    live_fleet.seed([f"node-{i}" for i in (1, 2, 3)])
    server = live_fleet.start_server()
    proxy = live_fleet.add(FaultProxy(server.agent_port, mode="corrupt", after_bytes=1000).start())
    agents = [
        # node-2 downloads through the bad link
        live_fleet.start_agent(token, url=proxy.ws_url if i == 1 else None)
        for i, token in enumerate(live_fleet.tokens)
    ]
    api, ids = live_fleet.api(), live_fleet.host_ids
    wait_until(lambda: api.all_online(ids), 30, what="agents online")
    return api, ids, agents, proxy


def versions(api, ids):
    return [api.host(i)["agent_version"] for i in ids]


def test_a_rollout_halts_at_the_bad_host_and_a_second_rollout_finishes_the_job(fleet):
    api, ids, agents, proxy = fleet
    r = api.post_json("/api/fleet/update")
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]

    fu = wait_until(lambda: api.fleet_update_ended(fid), 60, 0.05, "the rollout to end")
    assert fu["status"] == "halted"
    assert [h["status"] for h in fu["hosts"]] == ["succeeded", "failed", "pending"]
    assert "node-2" in fu["halt_reason"] and "sha256" in fu["halt_reason"]
    wait_until(lambda: versions(api, ids) == [B, A, A], 20, what="node-1 at B, the others at A")
    with open(agents[1].program, "rb") as f, open(agents[2].program, "rb") as g:
        assert f.read() == g.read()  # node-2 still runs its old program, like untouched node-3
    alerts = api.open_alerts()
    assert {a["kind"] for a in alerts} == {"fleet_update_halted", "update_failed"}
    actions = api.audit_actions()
    for action in (
        "fleet.update_started",
        "host.update_dispatched",
        "host.update_succeeded",
        "host.update_failed",
        "fleet.update_halted",
    ):
        assert action in actions

    proxy.set_mode("pass")  # the artifact is fixed
    r = api.post_json("/api/fleet/update")
    assert r.status_code == 201, r.text
    fid2 = r.json()["fleet_update"]["id"]
    fu2 = wait_until(lambda: api.fleet_update_ended(fid2), 60, 0.05, "the second rollout to end")
    assert fu2["status"] == "succeeded", fu2
    assert [h["name"] for h in fu2["hosts"]] == ["node-2", "node-3"]  # only the hosts still behind
    assert versions(api, ids) == [B, B, B]
    assert api.open_alerts() == []
    assert "fleet.update_succeeded" in api.audit_actions()
