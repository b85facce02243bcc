"""/metrics scraped during a real update: a real server process, a real agent updated by a rollout.

Every figure the scrape exposes must move the way the update moved it.
"""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.live import AgentProcess, ServerProcess, built_agent, seed_fleet
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

A, B = "1.0.0", "2.0.0"


def scrape(base: str, token: str | None) -> dict[tuple[str, tuple], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.get(base + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def scrape_until(base, token, ok, what, timeout=60.0):
    def attempt():
        s = scrape(base, token)
        return s if ok(s) else None

    return wait_until(attempt, timeout, 0.1, what)


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def world(app, tmp_path, tmp_path_factory, database_url):
    ids, tokens, api_token = seed_fleet(["node-1"])
    server = ServerProcess(str(tmp_path / "server"), database_url, B, {"RM_FLEET_TICK_S": "0.5"}).start()
    src = built_agent(A, str(tmp_path_factory.getbasetemp() / "agent-builds"))
    agent = AgentProcess(str(tmp_path / "agent"), src, server.agent_ws_url, tokens[0]).start()
    try:
        yield server, ids[0], api_token
    finally:
        agent.stop()
        server.stop()


def test_the_numbers_move_with_a_real_update(world):
    server, host_id, token = world
    base = server.admin_url
    assert requests.get(base + "/metrics", timeout=10).status_code == 401  # a token or a session

    # The link registers the connection before the hello's row is committed: wait for the row.
    before = scrape_until(
        base,
        token,
        lambda s: value(s, "rm_hosts", agent_version=A, version_state="behind", state="online") == 1,
        "the agent online",
    )
    assert value(before, "rm_agents_connected") == 1
    assert value(before, "rm_update_jobs_total", outcome="succeeded") == 0
    assert value(before, "rm_rollout_running") == 0

    r = requests.post(base + "/api/fleet/update", json={}, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    during = scrape(base, token)
    assert value(during, "rm_rollout_running") == 1
    assert sum(value(during, "rm_rollout_hosts", rollout=str(fid), status=s) for s in ("pending", "running")) == 1

    after = scrape_until(
        base,
        token,
        lambda s: (
            value(s, "rm_rollout_hosts", rollout=str(fid), status="succeeded") == 1
            and value(s, "rm_rollout_running") == 0
        ),
        "the rollout to succeed",
    )
    assert value(after, "rm_update_jobs_total", outcome="succeeded") == 1
    assert value(after, "rm_update_duration_seconds_count", outcome="succeeded") == 1
    assert 0 < value(after, "rm_update_duration_seconds_sum", outcome="succeeded") < 60
    assert value(after, "rm_update_dispatch_to_command_seconds_count") == 1
    assert value(after, "rm_hosts", agent_version=B, version_state="current", state="online") == 1
    assert value(after, "rm_hosts", agent_version=A, version_state="behind", state="online") == 0
    assert value(after, "rm_agents_connected") == 1
    assert value(after, "rm_scheduler_tick_seconds_count", job="fleet_tick") >= 1
    assert value(after, "rm_agent_frames_rate_limited_total") == 0
