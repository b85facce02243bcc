"""Fleet revert over real agents and a real server process: a rollout updates hosts from an old
signed release the server kept to the server's version, then a revert takes every updated host
back to what it ran; and ``revert_on_halt`` does it by itself when the rollout halts.

A failing host is one whose agent downloads through a corrupting proxy (as in
``test_fleet_policies``): the artifact's sha256 does not match and the agent keeps its program.
"""

from __future__ import annotations

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

A, B = "1.0.0", "2.0.0"  # the hosts' old version (a kept release) and the server's


def start_fleet(live_fleet, n, bad=()):
    """``n`` hosts at A with A registered as a kept, signed release; those in ``bad`` download
    through a corrupting proxy."""
    from app.updates import releases

    live_fleet.seed([f"node-{i}" for i in range(1, n + 1)])
    kept = releases.register(live_fleet.program(A), A)  # the build's .sig beside it: signed
    assert kept.signature
    server = live_fleet.start_server(RM_FLEET_TICK_S="0.2", RM_UPDATE_TIMEOUT="30")
    proxy = live_fleet.add(FaultProxy(server.agent_port, mode="corrupt", after_bytes=1000).start())
    for i, token in enumerate(live_fleet.tokens, start=1):
        live_fleet.start_agent(token, A, url=proxy.ws_url if i in bad else None)
    api, ids = live_fleet.api(), live_fleet.host_ids
    wait_until(lambda: api.all_online(ids), 60, what="agents online")
    return api, ids


def versions(api, ids):
    return [api.host(i)["agent_version"] for i in ids]


def statuses(fu):
    return [h["status"] for h in fu["hosts"]]


def audit(api, action):
    return [e for e in api.get_json("/api/audit?limit=500")["events"] if e["action"] == action]


def test_a_revert_takes_every_updated_host_back_to_its_old_version(live_fleet):
    api, ids = start_fleet(live_fleet, 3)
    r = api.post_json("/api/fleet/update", {"max_in_flight": 2})
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    fu = wait_until(lambda: api.fleet_update_ended(fid), 120, 0.1, "the rollout to end")
    assert fu["status"] == "succeeded" and statuses(fu) == ["succeeded"] * 3, fu
    # An update's rows name the version each host left; their target is the rollout's.
    assert fu["target_version"] == B and [h["from_version"] for h in fu["hosts"]] == [A, A, A]
    wait_until(lambda: versions(api, ids) == [B, B, B], 30, what="every host at B")

    r = api.post_json(f"/api/fleet-updates/{fid}/revert")
    assert r.status_code == 201, r.text
    rev = r.json()["fleet_update"]
    assert (rev["kind"], rev["parent_id"], rev["max_in_flight"]) == ("revert", fid, "2")  # the parent's strategy
    assert [h["name"] for h in rev["hosts"]] == ["node-1", "node-2", "node-3"]
    assert [h["target_version"] for h in rev["hosts"]] == [A, A, A]

    fu = wait_until(lambda: api.fleet_update_ended(rev["id"]), 120, 0.1, "the revert to end")
    assert fu["status"] == "succeeded" and statuses(fu) == ["succeeded"] * 3, fu
    assert [(h["from_version"], h["target_version"]) for h in fu["hosts"]] == [(B, A)] * 3
    # The agents came back saying hello at A: the host rows say so.
    wait_until(lambda: versions(api, ids) == [A, A, A], 30, what="every host back at A")
    assert api.all_online(ids)

    started = [e for e in audit(api, "fleet.update_started") if e["target"] == f"fleet_update:{rev['id']}"]
    assert len(started) == 1
    details = started[0]["details"]
    assert (details["kind"], details["parent_id"]) == ("revert", fid)
    assert details["versions"] == {"node-1": A, "node-2": A, "node-3": A}
    assert [e["target"] for e in audit(api, "fleet.update_succeeded")].count(f"fleet_update:{rev['id']}") == 1

    # A revert is not itself revertible (start an update instead).
    r = api.post_json(f"/api/fleet-updates/{rev['id']}/revert")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "fleet_update_is_a_revert"), r.text


def test_revert_on_halt_takes_the_updated_host_back_by_itself(live_fleet):
    # node-1 (wave 0) updates; node-2 (wave 1) downloads a corrupted artifact, fails, and the
    # rollout halts over its budget of 0 failures; the revert starts by itself for node-1.
    api, ids = start_fleet(live_fleet, 2, bad={2})
    r = api.post_json("/api/fleet/update", {"max_in_flight": 1, "max_failures": 0, "revert_on_halt": True})
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    assert r.json()["fleet_update"]["revert_on_halt"] is True

    fu = wait_until(lambda: api.fleet_update_ended(fid), 120, 0.1, "the rollout to halt")
    assert fu["status"] == "halted" and statuses(fu) == ["succeeded", "failed"], fu

    def the_revert():
        found = [f for f in api.get_json("/api/fleet-updates")["fleet_updates"] if f.get("parent_id") == fid]
        return found[0] if found and found[0]["kind"] == "revert" else None

    rev = wait_until(the_revert, 60, 0.1, "the automatic revert to start")
    assert [h["name"] for h in rev["hosts"]] == ["node-1"]
    fu = wait_until(lambda: api.fleet_update_ended(rev["id"]), 120, 0.1, "the revert to end")
    assert fu["status"] == "succeeded" and statuses(fu) == ["succeeded"], fu
    wait_until(lambda: versions(api, ids) == [A, A], 30, what="node-1 back at A (node-2 never left it)")
    assert api.fleet_update(fid)["revert_on_halt"] is False  # cleared when the revert started
    started = [e for e in audit(api, "fleet.update_started") if e["target"] == f"fleet_update:{rev['id']}"]
    assert started[0]["details"]["kind"] == "revert" and started[0]["details"]["parent_id"] == fid
    assert started[0]["details"]["versions"] == {"node-1": A}
