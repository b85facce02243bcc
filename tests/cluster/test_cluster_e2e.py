"""Several real server processes on one PostgreSQL database, real agents, a real HAProxy in front.

1. A rollout survives a SIGKILL of the instance holding its current host: the agents reconnect
   through HAProxy to the survivor, and the rollout completes with one job per host.
2. An update asked of one instance runs on an agent held by another.
3. PostgreSQL itself restarts (a private server the test starts): nothing is lost, the instances
   reconnect and carry on.
"""

from __future__ import annotations

import os

import pytest
import requests
import sqlalchemy as sa

from app import create_app
from tests.support import dbsetup
from tests.support.cluster import HAProxy, PrivatePostgres, haproxy_binary, postgres_bindir
from tests.support.live import LiveClient, ServerProcess, seed_fleet
from tests.support.wait import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e, pytest.mark.timeout(300)]

needs_haproxy = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed (scripts/test installs it)")

#: Fast instance heartbeats, so a dead instance is noticed within ~2.5 s.
CLUSTER_ENV = {
    "RM_INSTANCE_HEARTBEAT_S": "0.5",
    "RM_INSTANCE_EXPIRY_S": "2",
    "RM_UPDATE_TIMEOUT": "40",
    "RM_FLEET_TICK_S": "1",
    "RM_FLEET_OFFLINE_GRACE_S": "20",
}


class Cluster:
    """Instances (``serve`` processes) on one database, read directly for what the API does not show."""

    def __init__(self, live_fleet, database_url: str):
        self.fleet = live_fleet
        self.url = database_url
        self.engine = sa.create_engine(database_url, pool_pre_ping=True)
        self.servers: list[ServerProcess] = []

    def start(self, n: int = 2, **env) -> list[ServerProcess]:
        for i in range(n):
            s = ServerProcess(
                os.path.join(self.fleet.root, f"server{i}"), self.url, self.fleet.version, {**CLUSTER_ENV, **env}
            )
            self.fleet.add(s)
            self.servers.append(s.start())  # one at a time: the first registers the release
        return self.servers

    def instance_id(self, server: ServerProcess) -> int | None:
        with self.engine.connect() as c:
            return c.execute(sa.text("SELECT id FROM instances WHERE pid = :p"), {"p": server.proc.pid}).scalar()

    def holders(self, host_ids) -> dict[int, int | None]:
        with self.engine.connect() as c:
            rows = c.execute(
                sa.text("SELECT id, CASE WHEN connected THEN instance_id END FROM hosts WHERE id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": list(host_ids)},
            ).all()
        return dict(rows)

    def job_phase(self, host_id: int) -> str | None:
        with self.engine.connect() as c:
            return c.execute(
                sa.text("SELECT phase FROM jobs WHERE host_id = :h ORDER BY created_at DESC LIMIT 1"), {"h": host_id}
            ).scalar()

    def close(self) -> None:
        self.engine.dispose()


def safely(fn):
    """A predicate that counts a refused or failing request (an instance or the database down) as "not yet"."""

    def attempt():
        try:
            return fn()
        except (requests.RequestException, sa.exc.OperationalError):
            return None

    return attempt


def assert_rollout_complete(api: LiveClient, fid: int, ids: list[int], version: str) -> None:
    fu = wait_until(safely(lambda: api.fleet_update_ended(fid)), 120, 0.2, "the rollout to finish")
    assert fu["status"] == "succeeded", fu
    assert [h["status"] for h in fu["hosts"]] == ["succeeded"] * len(ids)
    for i in ids:
        assert [j["status"] for j in api.jobs(i)] == ["succeeded"], api.jobs(i)  # exactly one job per host
    actions = api.audit_actions()
    assert actions.count("host.update_dispatched") == len(ids)
    assert actions.count("host.update_succeeded") == len(ids)
    assert actions.count("fleet.update_started") == 1 and actions.count("fleet.update_succeeded") == 1
    assert "host.update_failed" not in actions
    hosts = wait_until(
        safely(lambda: (hs := [api.host(i) for i in ids]) and all(h["online"] for h in hs) and hs),
        30,
        0.2,
        "every host back online",
    )
    assert {h["agent_version"] for h in hosts} == {version}


@pytest.fixture
def cluster(live_fleet, database_url):
    c = Cluster(live_fleet, database_url)
    yield c
    c.close()


@needs_haproxy
def test_a_rollout_survives_a_kill_of_the_instance_holding_its_current_host(cluster, live_fleet, tmp_path):
    live_fleet.seed([f"node-{i}" for i in (1, 2, 3, 4)])
    ids = live_fleet.host_ids
    a, b = cluster.start(2)
    proxy = live_fleet.add(HAProxy(str(tmp_path / "haproxy"), [("127.0.0.1", s.agent_port) for s in (a, b)]).start())
    for token in live_fleet.tokens:
        # a slow service manager (1 s RestartSec) leaves a window in which node-1 is "restarting"
        live_fleet.start_agent(token, url=proxy.ws_url, restart_sec=1.0)
    ia, ib = cluster.instance_id(a), cluster.instance_id(b)
    held = wait_until(lambda: (h := cluster.holders(ids)) and None not in h.values() and h, 60, 0.1, "agents online")
    assert set(held.values()) == {ia, ib}, held  # the balancer spread the agents over both instances

    fid = LiveClient(a.admin_url, live_fleet.api_token).post_json("/api/fleet/update").json()["fleet_update"]["id"]
    wait_until(lambda: cluster.job_phase(ids[0]) == "restarting", 30, 0.01, "node-1 restarting")
    victim, survivor = (a, b) if held[ids[0]] == ia else (b, a)
    victim_id = ia if victim is a else ib
    victim.kill()

    # its hosts are offline, or back on the survivor, within a few seconds
    wait_until(lambda: victim_id not in cluster.holders(ids).values(), 5, 0.05, "the dead instance's hosts released")
    api = LiveClient(survivor.admin_url, live_fleet.api_token)
    assert_rollout_complete(api, fid, ids, live_fleet.version)
    assert set(cluster.holders(ids).values()) == {cluster.instance_id(survivor)}

    def victim_reaped():  # the survivor deletes the dead instance's row once its heartbeat expired
        with cluster.engine.connect() as c:
            return c.execute(sa.text("SELECT count(*) FROM instances WHERE id = :v"), {"v": victim_id}).scalar() == 0

    wait_until(victim_reaped, 30, 0.2, "the killed instance's row to be reaped")


def test_an_update_asked_of_one_instance_runs_on_the_agent_held_by_the_other(cluster, live_fleet):
    live_fleet.seed(["solo"])
    host = live_fleet.host_ids[0]
    a, b = cluster.start(2)
    live_fleet.start_agent(live_fleet.tokens[0], url=b.agent_ws_url)
    ib = cluster.instance_id(b)
    wait_until(lambda: cluster.holders([host])[host] == ib, 30, 0.05, "the agent held by instance b")

    api_a = LiveClient(a.admin_url, live_fleet.api_token)
    ping = api_a.post_json(f"/api/hosts/{host}/ping")
    assert ping.status_code == 200 and ping.json()["rtt_ms"] > 0, ping.text
    r = api_a.post_json(f"/api/hosts/{host}/update")
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    again = api_a.post_json(f"/api/hosts/{host}/update")
    assert again.status_code == 409 and again.json()["error"]["code"] == "update_in_progress"

    job = wait_until(
        lambda: (j := api_a.get_json(f"/api/jobs/{job_id}")["job"]) and j["status"] != "running" and j,
        60,
        0.1,
        "the job",
    )
    assert job["status"] == "succeeded", job
    assert [j["id"] for j in api_a.jobs(host)] == [job_id]
    assert api_a.audit_actions().count("host.update_dispatched") == 1
    assert api_a.host(host)["agent_version"] == live_fleet.version


@needs_haproxy
@pytest.mark.skipif(postgres_bindir() is None, reason="PostgreSQL's server binaries not installed")
def test_a_postgres_restart_mid_rollout_loses_nothing_and_the_instances_carry_on(live_fleet, tmp_path):
    pg = PrivatePostgres().init().start()
    url = pg.url()
    dbsetup.migrate(url, str(tmp_path / "migrate"))
    seeding = create_app(
        {"SQLALCHEMY_DATABASE_URI": url, "INSTANCE_PATH": str(tmp_path / "seed"), "SECRET_KEY": "x"}, {}
    )
    with seeding.app_context():
        from app.extensions import db

        live_fleet.host_ids, live_fleet.tokens, live_fleet.api_token = seed_fleet(["pg-1", "pg-2", "pg-3"])
        db.session.remove()
        db.engine.dispose()
    ids = live_fleet.host_ids
    cluster = Cluster(live_fleet, url)
    try:
        a, b = cluster.start(2)
        proxy = live_fleet.add(
            HAProxy(str(tmp_path / "haproxy"), [("127.0.0.1", s.agent_port) for s in (a, b)]).start()
        )
        for token in live_fleet.tokens:
            live_fleet.start_agent(token, url=proxy.ws_url, restart_sec=1.0)
        wait_until(lambda: None not in cluster.holders(ids).values(), 60, 0.1, "agents online")
        before = {cluster.instance_id(a), cluster.instance_id(b)}

        api = LiveClient(a.admin_url, live_fleet.api_token)
        fid = api.post_json("/api/fleet/update").json()["fleet_update"]["id"]
        wait_until(lambda: cluster.job_phase(ids[0]) == "restarting", 30, 0.01, "pg-1 restarting")
        pg.restart()

        assert_rollout_complete(api, fid, ids, live_fleet.version)
        # both instances carry on as themselves: registered again under their ids, heartbeats fresh
        fresh = sa.text("SELECT id FROM instances WHERE heartbeat_at > timezone('UTC', now()) - interval '2 seconds'")

        def live_instances():
            with cluster.engine.connect() as c:
                return set(c.execute(fresh).scalars())

        assert wait_until(safely(lambda: live_instances() == before), 10, 0.2, "both instances' heartbeats")
        assert a.proc.poll() is None and b.proc.poll() is None
        for server in (a, b):  # they did see the restart, and listen again
            with open(server.log_path, errors="replace") as f:
                text = f.read()
            assert "lost its listening connection" in text and "listens again" in text
    finally:
        cluster.close()
        live_fleet.stop()  # the servers before their database
        pg.remove()
