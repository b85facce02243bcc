"""``serve --workers N`` on PostgreSQL: N instances share one agent port (SO_REUSEPORT) and one admin plane."""

from __future__ import annotations

import os
import signal

import pytest
import sqlalchemy as sa

from tests.support.live import LiveClient, ServerProcess
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e, pytest.mark.timeout(180)]

AGENTS = 16


def test_workers_share_the_agent_port_and_a_command_reaches_a_host_on_any_worker(live_fleet, database_url):
    live_fleet.seed([f"w-{i:02d}" for i in range(AGENTS)])
    env = {"RM_INSTANCE_HEARTBEAT_S": "0.5", "RM_INSTANCE_EXPIRY_S": "2", "RM_UPDATE_TIMEOUT": "30"}
    server = ServerProcess(
        os.path.join(live_fleet.root, "server"), database_url, live_fleet.version, env, ("--workers", "2")
    )
    live_fleet.add(server)
    server.start()
    engine = sa.create_engine(database_url)
    agents = []
    try:

        def rows(sql, **params):
            with engine.connect() as c:
                return c.execute(sa.text(sql), params).all()

        assert len(rows("SELECT id FROM instances")) == 2
        for token in live_fleet.tokens:
            agent = ScriptedAgent(server.agent_ws_url, token, "1.0.0")
            agent.connect()
            agents.append(agent)
        held = wait_until(
            lambda: (r := dict(rows("SELECT id, instance_id FROM hosts WHERE connected"))) and len(r) == AGENTS and r,
            30,
            0.05,
            "every agent online",
        )
        workers = set(held.values())
        assert len(workers) == 2, held  # the kernel spread the connections over both workers

        # the admin plane (worker 0) dispatches to a host on each worker: one job each, delivered
        api = LiveClient(server.admin_url, live_fleet.api_token)
        by_worker = {}
        for host_id, instance in held.items():
            by_worker.setdefault(instance, host_id)
        for host_id in by_worker.values():
            r = api.post_json(f"/api/hosts/{host_id}/update")
            assert r.status_code == 202, r.text
            agent = agents[live_fleet.host_ids.index(host_id)]
            assert agent.expect("command.update", timeout=10).data["job_id"] == r.json()["job"]["id"]

        # a worker that dies is started again, as a new instance; its hosts go offline meanwhile
        victim = next(iter(workers))
        pid = rows("SELECT pid FROM instances WHERE id = :i", i=victim)[0][0]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(rows("SELECT id FROM instances WHERE id <> :i", i=victim)) == 2, 30, 0.1, "a new worker")
        wait_until(lambda: not rows("SELECT id FROM hosts WHERE instance_id = :i", i=victim), 10, 0.1, "hosts released")
    finally:
        for agent in agents:
            agent.disconnect()
        engine.dispose()
    assert server.stop() == 0
    with engine.connect() as c:  # every worker left: no instance row stays behind
        assert c.execute(sa.text("SELECT count(*) FROM instances")).scalar() == 0
    engine.dispose()
