"""A rollout that selects hosts by label, over real agents: only the matching hosts are updated."""

from __future__ import annotations

import pytest

from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


def test_a_rollout_by_label_updates_exactly_the_matching_hosts_less_the_excluded_one(live_fleet):
    live_fleet.seed([f"node-{i}" for i in (1, 2, 3, 4)])
    live_fleet.start_server()
    agents = live_fleet.start_agents()
    api, ids = live_fleet.api(), live_fleet.host_ids
    wait_until(lambda: api.all_online(ids), 30, what="agents online")
    for host_id, env in zip(ids, ("prod", "staging", "prod", "prod"), strict=True):
        r = api.http.put(f"{api.base}/api/hosts/{host_id}/labels", json={"labels": {"env": env}}, timeout=10)
        assert r.status_code == 200, r.text
    body = {"labels": {"env": "prod"}, "os": api.host(ids[0])["os"], "exclude_host_ids": [ids[3]]}

    r = api.post_json("/api/fleet/plan", body)
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert [h["name"] for h in plan["hosts"]] == ["node-1", "node-3"]
    assert [(lo["name"], lo["reason"]) for lo in plan["left_out"]] == [("node-4", "excluded")]

    r = api.post_json("/api/fleet/update", body)
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    fu = wait_until(lambda: api.fleet_update_ended(fid), 90, 0.05, "the rollout to end")
    assert fu["status"] == "succeeded", fu
    assert fu["selector"] == body
    assert [(h["name"], h["status"]) for h in fu["hosts"]] == [("node-1", "succeeded"), ("node-3", "succeeded")]
    wait_until(lambda: [api.host(i)["agent_version"] for i in ids] == [B, A, B, A], 20, what="only node-1, node-3 at B")
    assert [api.jobs(i) == [] for i in ids] == [False, True, False, True]  # the others were never touched
    with open(agents[1].program, "rb") as f, open(agents[3].program, "rb") as g:
        assert f.read() == g.read()  # node-2 and node-4 still run their old program
    assert api.audit_actions().count("host.labels_changed") == 4
