"""Several instances on one PostgreSQL database, in one test process: two apps, each really served."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from agent import protocol
from app.extensions import db
from app.models import AuditEvent, Host, Instance, Job
from app.runtime import runtime
from app.updates import dispatch
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


def fresh(model, ident):
    db.session.rollback()
    return db.session.get(model, ident)


def held_by(host_id: int) -> int | None:
    db.session.rollback()
    return db.session.scalar(sa.select(Host.instance_id).where(Host.id == host_id, Host.connected.is_(True)))


def connect(server, host, token, version):
    agent = ScriptedAgent(server.agent_ws_url, token, version)
    agent.connect()
    wait_until(lambda: held_by(host.id) == runtime(server.app).instance_id, what="the host held by that instance")
    return agent


def test_each_serving_process_registers_as_an_instance_and_exactly_one_leads(pair):
    a, b = pair
    ra, rb = runtime(a.app), runtime(b.app)
    db.session.rollback()
    ids = set(db.session.scalars(sa.select(Instance.id)))
    assert ids == {ra.instance_id, rb.instance_id} and None not in ids
    wait_until(lambda: ra.cluster.leader or rb.cluster.leader, what="a leader")
    time.sleep(0.5)  # several heartbeats: nobody else grabs the lock
    assert [ra.cluster.leader, rb.cluster.leader].count(True) == 1


def test_a_dispatch_on_one_instance_reaches_the_agent_held_by_the_other(pair, cast, client, api_headers, release):
    a, b = pair
    release.signature = "c2lnbmVk"  # stands for a signed release: the frame must carry it
    db.session.commit()
    agent = connect(b, cast.host_behind, cast.host_behind_token, cast.host_behind.agent_version)
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=api_headers)  # on instance a
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["job"]["id"]
    cmd = agent.expect("command.update")
    assert cmd.data["job_id"] == job_id and cmd.data["host_id"] == cast.host_behind.id
    assert cmd.data["version"] == a.app.config["SERVER_VERSION"]
    # the holder's one read (job and release) makes the very frame a local dispatch sends
    local = protocol.decode(dispatch.update_frame(fresh(Job, job_id), "c2lnbmVk"))
    assert cmd.data == local.data and cmd.data["signature"] == "c2lnbmVk"
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(Job.id))) == 1
    actions = db.session.scalars(sa.select(AuditEvent.action).where(AuditEvent.action == "host.update_dispatched"))
    assert list(actions) == ["host.update_dispatched"]
    # the same pre-checks as a local dispatch: a second click is refused, not a second job
    again = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=api_headers)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "update_in_progress"
    # the agent's report reaches the job from its own instance
    agent.send("update.result", job_id=job_id, ok=False, error="disk full")
    wait_until(lambda: fresh(Job, job_id).status == "failed", what="the job failed")
    assert fresh(Job, job_id).error == "disk full"
    agent.disconnect()


def test_a_host_held_by_no_live_instance_is_refused_as_offline(pair, cast, client, api_headers):
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=api_headers)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "host_offline"


def test_a_ping_on_one_instance_is_answered_by_the_agent_on_the_other(pair, cast, client, api_headers):
    a, b = pair
    agent = connect(b, cast.host_online, cast.host_online_token, cast.host_online.agent_version)
    r = client.post(f"/api/hosts/{cast.host_online.id}/ping", headers=api_headers)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["rtt_ms"] > 0
    agent.disconnect()
    wait_until(lambda: held_by(cast.host_online.id) is None, what="the host offline")
    r = client.post(f"/api/hosts/{cast.host_online.id}/ping", headers=api_headers)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "host_offline"


def test_revoking_on_one_instance_closes_the_socket_held_by_the_other(pair, cast, client, api_headers):
    a, b = pair
    agent = connect(b, cast.host_online, cast.host_online_token, cast.host_online.agent_version)
    r = client.post(f"/api/hosts/{cast.host_online.id}/revoke", headers=api_headers)
    assert r.status_code == 200
    wait_until(lambda: runtime(b.app).connections.get(cast.host_online.id) is None, what="b closed the socket")
    wait_until(lambda: not agent.ws.connected, what="the agent's socket closed")
    assert not fresh(Host, cast.host_online.id).connected


def test_when_the_leader_stops_it_releases_the_lock_and_another_instance_takes_over(pair):
    a, b = pair
    ra, rb = runtime(a.app), runtime(b.app)
    wait_until(lambda: ra.cluster.leader or rb.cluster.leader, what="a leader")
    leader, follower = (a, rb) if ra.cluster.leader else (b, ra)
    leading = runtime(leader.app).cluster
    lock_conn = leading._lock_conn
    assert lock_conn is not None and not lock_conn.closed
    leader.servers.stop()
    # The stop itself closed the connection holding the advisory lock: nothing else would release
    # it in this process (the lock has no expiry), so the takeover below follows from the stop.
    assert lock_conn.closed and leading._lock_conn is None and not leading.leader
    # The follower tries the lock at each heartbeat (0.2 s here); 30 s is far from load noise.
    wait_until(lambda: follower.cluster.leader, 30.0, 0.02, "the follower to lead")


def test_the_hosts_of_an_instance_whose_heartbeat_expired_go_offline(pair, cast):
    db.session.execute(
        sa.text(
            "INSERT INTO instances (id, name, pid, started_at, heartbeat_at) "
            "VALUES (999, 'gone', 1, now() - interval '1 hour', now() - interval '1 hour')"
        )
    )
    db.session.execute(sa.update(Host).where(Host.id == cast.host_online.id).values(connected=True, instance_id=999))
    db.session.commit()
    wait_until(lambda: not fresh(Host, cast.host_online.id).connected, 5.0, 0.05, "the dead instance's host offline")
    assert fresh(Host, cast.host_online.id).instance_id is None
    assert fresh(Instance, 999) is None


def test_a_command_routed_to_an_instance_that_died_is_sent_with_the_agents_next_hello(pair, cast, client, api_headers):
    """The notification went to an instance that died before sending; the job row is the command."""
    a, b = pair
    # a peer that looks alive (fresh heartbeat) holds the host, but listens to nothing
    db.session.execute(
        sa.text(
            "INSERT INTO instances (id, name, pid, started_at, heartbeat_at) "
            "VALUES (998, 'dying', 1, timezone('UTC', now()), timezone('UTC', now()) + interval '1 hour')"
        )
    )
    h = cast.host_behind
    db.session.execute(sa.update(Host).where(Host.id == h.id).values(connected=True, instance_id=998))
    db.session.commit()
    r = client.post(f"/api/hosts/{h.id}/update", headers=api_headers)
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["job"]["id"]
    agent = ScriptedAgent(b.agent_ws_url, cast.host_behind_token, h.agent_version)
    agent.connect()  # the agent reconnects through the balancer, to b
    cmd = agent.expect("command.update")
    assert cmd.data["job_id"] == job_id
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(Job.id))) == 1
    agent.disconnect()
    db.session.execute(sa.text("DELETE FROM instances WHERE id = 998"))
    db.session.commit()
