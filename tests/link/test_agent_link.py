"""The agent link over real sockets: authentication, hello/welcome, bad frames, replacement, idle drop."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import requests
import simple_websocket

from agent import protocol
from app.extensions import db
from app.models import Host
from app.runtime import runtime
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


def hello(version="2.0.0", **over):
    data = {
        "agent_version": version,
        "os": "linux",
        "arch": "x86_64",
        "hostname": "web-1.example",
        "python": "3.11.7",
        "capabilities": ["update"],
        "boot_id": "b0075e1d",
        "last_update": None,
    }
    data.update(over)
    return protocol.encode("hello", data)


def connect(live, token):
    return simple_websocket.Client.connect(
        live.agent_ws_url + "/ws/agent", headers={"Authorization": f"Bearer {token}"}
    )


def host_row(host_id):
    db.session.rollback()  # see what the server threads committed
    return db.session.get(Host, host_id)


def recv(ws, timeout=5):
    raw = ws.receive(timeout=timeout)
    assert raw is not None, "no frame arrived"
    return protocol.decode(raw)


def test_it_welcomes_a_valid_hello_and_marks_the_host_online(live, cast):
    host_id = cast.host_offline.id
    ws = connect(live, cast.host_offline_token)
    ws.send(hello(version="1.5.0", hostname="db-1.example"))
    env = recv(ws)
    assert env.type == "welcome"
    assert env.data["server_version"] == "2.0.0"
    assert env.data["heartbeat_s"] == 0.2
    wait_until(lambda: host_row(host_id).connected, what="host online")
    h = host_row(host_id)
    assert (h.agent_version, h.hostname, h.capabilities) == ("1.5.0", "db-1.example", ["update"])
    ws.close()
    wait_until(lambda: not host_row(host_id).connected, what="host offline after close")


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc"])
def test_it_refuses_the_upgrade_without_a_valid_token(live, cast, header):
    headers = {"Authorization": header} if header else {}
    with pytest.raises(simple_websocket.ConnectionError) as e:
        simple_websocket.Client.connect(live.agent_ws_url + "/ws/agent", headers=headers)
    assert e.value.status_code == 401


def test_it_refuses_a_revoked_token_and_closes_the_live_socket(live, cast, app):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    host = db.session.get(Host, cast.host_offline.id)
    host.revoke()
    db.session.commit()
    runtime(app).connections.close(host.id, protocol.CLOSE_REVOKED, "revoked")
    wait_until(lambda: not ws.connected, what="socket closed")
    assert ws.close_reason == protocol.CLOSE_REVOKED
    wait_until(lambda: not host_row(host.id).connected, what="the revoked host offline")
    with pytest.raises(simple_websocket.ConnectionError):
        connect(live, cast.host_offline_token)


def test_a_first_frame_that_is_not_hello_gets_an_error_and_a_close(live, cast):
    ws = connect(live, cast.host_offline_token)
    ws.send(protocol.encode("heartbeat"))
    env = recv(ws)
    assert env.type == "error" and env.data["code"] == "expected_hello"
    wait_until(lambda: not ws.connected, what="close")
    assert ws.close_reason == protocol.CLOSE_POLICY


def test_a_hello_missing_a_field_is_named_in_the_error(live, cast):
    ws = connect(live, cast.host_offline_token)
    frame = json.loads(hello())
    del frame["data"]["boot_id"]
    ws.send(json.dumps(frame))
    env = recv(ws)
    assert env.data["code"] == "missing_field"
    assert "boot_id" in env.data["message"]


def test_invalid_json_and_unknown_types_get_errors_and_keep_the_connection(live, cast):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    ws.send("{not json")
    assert recv(ws).data["code"] == "invalid_json"
    ws.send(json.dumps({"type": "telepathy", "id": "x1", "data": {}}))
    env = recv(ws)
    assert env.data["code"] == "unknown_type" and env.data["ref"] == "x1"
    ws.send(protocol.encode("ping"))
    env = recv(ws)
    assert env.type == "pong"
    assert ws.connected


def test_a_frame_over_the_size_limit_closes_with_1009(live, cast):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    ws.send("x" * (protocol.MAX_FRAME_BYTES + 1))
    wait_until(lambda: not ws.connected, what="close")
    assert ws.close_reason == protocol.CLOSE_TOO_BIG


def test_a_second_connection_replaces_the_first(live, cast, app):
    first = connect(live, cast.host_offline_token)
    first.send(hello())
    assert recv(first).type == "welcome"
    second = connect(live, cast.host_offline_token)
    second.send(hello())
    assert recv(second).type == "welcome"
    wait_until(lambda: not first.connected, what="first closed")
    assert first.close_reason == protocol.CLOSE_REPLACED
    assert runtime(app).connections.get(cast.host_offline.id) is not None
    assert host_row(cast.host_offline.id).connected
    second.send(protocol.encode("ping"))
    assert recv(second).type == "pong"


def test_a_silent_connection_is_dropped_after_the_heartbeat_timeout(live, cast):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    wait_until(lambda: not ws.connected, timeout=5, what="idle drop")
    assert ws.close_reason == protocol.CLOSE_IDLE
    wait_until(lambda: not host_row(cast.host_offline.id).connected, what="offline")


def test_the_server_can_ping_a_connected_agent(live, cast, app):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    conn = runtime(app).connections.get(cast.host_offline.id)
    result = {}

    import threading

    t = threading.Thread(target=lambda: result.setdefault("rtt", conn.ping(5)))
    t.start()
    env = recv(ws)
    assert env.type == "ping"
    ws.send(protocol.encode("pong", {"ref": env.id}))
    t.join(5)
    assert result["rtt"] is not None and result["rtt"] < 5


def test_each_plane_answers_404_for_the_other_planes_routes(live, cast):
    assert requests.get(live.agent_http_url + "/login", timeout=5).status_code == 404
    assert requests.get(live.agent_http_url + "/api/version", timeout=5).status_code == 404
    assert requests.get(live.admin_url + "/agent/health", timeout=5).status_code == 404
    assert requests.get(live.admin_url + "/ws/agent", timeout=5).status_code == 404
    assert requests.get(live.agent_http_url + "/agent/health", timeout=5).status_code == 200
    assert requests.get(live.admin_url + "/login", timeout=5).status_code == 200


def test_a_flood_of_frames_is_rate_limited_and_then_closed(live, cast, app):
    app.config["AGENT_MSG_RATE"] = 1.0
    app.config["AGENT_MSG_BURST"] = 5.0
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    for _ in range(5):
        ws.send(protocol.encode("heartbeat"))
    ws.send(protocol.encode("heartbeat"))
    env = recv(ws)
    assert env.type == "error" and env.data["code"] == "rate_limited"
    for _ in range(60):
        try:
            ws.send(protocol.encode("heartbeat"))
        except (simple_websocket.ConnectionClosed, OSError):
            break  # the server closed it mid-flood: what this test wants
    wait_until(lambda: not ws.connected, what="close for abuse")
    assert ws.close_reason == protocol.CLOSE_POLICY


def test_a_browser_origin_is_refused_on_the_agent_plane(live, cast):
    with pytest.raises(simple_websocket.ConnectionError) as e:
        simple_websocket.Client.connect(
            live.agent_ws_url + "/ws/agent",
            headers={"Authorization": f"Bearer {cast.host_offline_token}", "Origin": "https://evil.example"},
        )
    assert e.value.status_code == 403


def test_every_agent_plane_route_sits_under_an_agent_prefix(app):
    from app.serve import AGENT_PLANE_PREFIXES

    for rule in app.url_map.iter_rules():
        on_agent_plane = rule.endpoint.startswith("agentlink.")
        assert rule.rule.startswith(AGENT_PLANE_PREFIXES) == on_agent_plane, rule.rule


def test_pongs_to_the_servers_own_pings_are_never_rate_limited(live, cast, app):
    app.config["AGENT_MSG_RATE"] = 1.0
    app.config["AGENT_MSG_BURST"] = 2.0
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    conn = runtime(app).connections.get(cast.host_offline.id)
    import threading

    for _ in range(10):  # far past the burst: each pong must still get through
        result = {}
        t = threading.Thread(target=lambda r=result: r.setdefault("rtt", conn.ping(5)))
        t.start()
        env = recv(ws)
        assert env.type == "ping"
        ws.send(protocol.encode("pong", {"ref": env.id}))
        t.join(5)
        assert result["rtt"] is not None


def test_a_ping_with_a_nul_in_its_id_gets_an_error_not_a_dead_connection(live, cast):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    ws.send(json.dumps({"type": "ping", "id": "a\u0000b", "data": {}}))
    env = recv(ws)
    assert env.type == "error" and env.data["code"] == "invalid_field"
    ws.send(protocol.encode("ping"))
    assert recv(ws).type == "pong"


def test_stopping_the_server_closes_every_agent_link_as_going_away(live, cast, caplog):
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    with caplog.at_level(logging.INFO):
        live.servers.stop()
        wait_until(lambda: not ws.connected, what="the link closed by the stopping server")
        wait_until(
            lambda: not any("process_request_thread" in t.name for t in threading.enumerate()),
            what="the connection's thread to end",
        )
    assert ws.close_reason == protocol.CLOSE_GOING_AWAY
    # one summary line for the stop, not one request line per socket (thousands of them queued
    # for the log's lock while the process tried to exit)
    assert "1 agent sockets" in caplog.text
    assert not [r for r in caplog.records if r.name == "werkzeug" and "101" in r.getMessage()]


def agent_recording_sleeps(live, token: str, tmp_path):
    """A real agent of ``live`` whose reconnect sleeps are recorded (and not slept), jitter 1.0."""
    from agent.client import Agent
    from agent.config import parse_config

    sleeps: list[float] = []
    config = parse_config(
        {
            "server_url": live.agent_ws_url,
            "token": token,
            "state_dir": str(tmp_path),
            "backoff_max_s": 30,
            "allow_unsigned_updates": True,
        },
        str(tmp_path / "agent.toml"),
    )
    return Agent(config, sleep=sleeps.append, rand=lambda: 1.0, program=None), sleeps


def test_a_real_agent_retries_quickly_while_its_server_restarts(live, cast, tmp_path):
    """The agent's side of the 1001 close: refusals while the server is down do not climb the ladder."""
    from agent.transport import RESTART_RETRY_S
    from tests.support.peers import AgentThread

    agent, sleeps = agent_recording_sleeps(live, cast.host_offline_token, tmp_path)
    runner = AgentThread(agent).start()
    try:
        wait_until(lambda: host_row(cast.host_offline.id).connected, what="the agent online")
        live.servers.stop()
        wait_until(lambda: len(sleeps) >= 6, what="six reconnect attempts against the stopped server")
    finally:
        runner.stop(5)
    # the first reconnect after a welcomed link: 0.5 s; then every refusal within RESTART_RETRY_S
    # (without the 1001 rule: 1, 2, 4, 8, 16)
    assert sleeps[:6] == [0.5] + [RESTART_RETRY_S] * 5


def saturated_at(live, per_s: float) -> None:
    """Give the live agent plane a measured welcome rate: the real WelcomeRate, fed two saturated
    welcomes 1/per_s apart on a clock of the test's."""
    from app.agents.server import WelcomeRate

    now = [0.0]
    rate = WelcomeRate(window=1 / per_s, clock=lambda: now[0], max_gap=2 / per_s)
    for _ in range(2):
        rate.record(saturated=True)
        now[0] += 1 / per_s
    assert rate.rate == pytest.approx(per_s)
    live.servers.agent.welcome_rate = rate


def test_a_stop_names_the_window_its_agents_should_return_over(live, cast):
    """A process that measured how fast it welcomes agents when saturated asks them, in the 1001's
    reason, to spread their return over the time it needs for them (app/agents/server.py)."""
    ws = connect(live, cast.host_offline_token)
    ws.send(hello())
    assert recv(ws).type == "welcome"
    saturated_at(live, 0.1)  # one agent at 0.1 a second: 10 s, less the 3 s budget
    live.servers.stop()
    wait_until(lambda: not ws.connected, what="the link closed by the stopping server")
    assert ws.close_reason == protocol.CLOSE_GOING_AWAY
    assert ws.close_message == "server shutting down; reconnect within 7.0 s"
    assert protocol.reconnect_spread(ws.close_message) == 7.0


def test_a_real_agent_spreads_its_return_over_the_window_its_server_named(live, cast, tmp_path):
    from agent.transport import RESTART_RETRY_S
    from tests.support.peers import AgentThread

    agent, sleeps = agent_recording_sleeps(live, cast.host_offline_token, tmp_path)
    runner = AgentThread(agent).start()
    try:
        wait_until(lambda: host_row(cast.host_offline.id).connected, what="the agent online")
        saturated_at(live, 0.1)  # 10 s for its one agent, less the budget: 7 s
        live.servers.stop()
        wait_until(lambda: len(sleeps) >= 4, what="four reconnect attempts against the stopped server")
    finally:
        runner.stop(5)
    # the first attempt at a point of the 7 s window (its end, with rand 1.0), not after 0.5 s; each
    # refusal then within what is left of it (the clock is real, the sleeps are not), never the ladder
    assert sleeps[0] == pytest.approx(7.0, abs=0.5)
    assert all(RESTART_RETRY_S <= s <= 7.0 for s in sleeps[1:4]), sleeps
