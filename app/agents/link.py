"""One agent connection's life: hello, welcome, heartbeats, update reports, goodbye."""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from flask import current_app
from simple_websocket import ConnectionClosed

from agent import protocol

from ..extensions import db
from ..metrics import count_rate_limited
from ..models import Host
from ..runtime import runtime
from .presence import hello_values
from .registry import Connection
from .server import mark_welcomed, pause, resume

log = logging.getLogger(__name__)

#: How long a fresh socket may take to send its hello.
HELLO_TIMEOUT_S = 10.0
#: How long a hello waits for its group commit (app/agents/presence.py); the agent gives up on
#: its welcome after 10 s anyway.
HELLO_COMMIT_TIMEOUT_S = 10.0
#: Close code when the server could not record a hello: the agent reconnects with backoff.
CLOSE_TRY_AGAIN = 1013


def serve_connection(ws, host_id: int, remote: str) -> None:
    """Run one authenticated agent socket until it closes."""
    conn = Connection(host_id, ws, remote)
    cfg = current_app.config
    environ = getattr(ws, "environ", {})  # the request's, with its turn at the gate
    hello = _await_hello(conn, environ)
    if hello is None:
        return
    data = hello.data
    conn.agent_version = data["agent_version"]
    conn.update_unavailable = data.get("update_unavailable")
    from ..updates import fleet, watcher

    old = runtime().connections.register(conn)
    if old is not None:
        log.info("host %s reconnected from %s; closing its previous connection", host_id, remote)
        old.close(protocol.CLOSE_REPLACED, "replaced by a newer connection")
    try:
        ctx = watcher.HelloContext(data)
        # No turn while the hello waits for its group commit: the batch grows with every hello
        # waiting, instead of being bounded by the gate (app/agents/server.py).
        pause(environ)
        recorded = runtime().presence.hello(host_id, hello_values(data), timeout=HELLO_COMMIT_TIMEOUT_S, context=ctx)
        if not recorded or not resume(environ, HELLO_COMMIT_TIMEOUT_S):
            log.warning("host %s: its hello could not be recorded; closing so that it retries", host_id)
            conn.close(CLOSE_TRY_AGAIN, "server busy, try again")
            return
        conn.send(
            protocol.encode(
                "welcome",
                # host_id binds the agent's commands to it: it refuses a command.update for another host
                {"server_version": cfg["SERVER_VERSION"], "heartbeat_s": cfg["HEARTBEAT_S"], "host_id": host_id},
            )
        )
        mark_welcomed(environ)
        watcher.on_hello(host_id, data, ctx)
        fleet.host_connected(host_id)
        conn.settled.set()
        pause(environ)  # the handshake is done: the next connection's turn
        _read_loop(conn, cfg["HEARTBEAT_TIMEOUT"])
    except ConnectionClosed:
        pass
    finally:
        # Offline unless a newer connection took over. A revoke pops this connection from the
        # registry itself, so "was it still mine" is not the test: "is anyone live now" is.
        runtime().connections.unregister(conn)
        if runtime().connections.get(host_id) is None:
            runtime().presence.offline(host_id)
        db.session.close()


def _await_hello(conn: Connection, environ) -> protocol.Envelope | None:
    pause(environ)  # no handshake turn while the hello is on the wire (app/agents/server.py)
    try:
        raw = conn.ws.receive(timeout=HELLO_TIMEOUT_S)
    except ConnectionClosed:
        return None
    if raw is not None and not resume(environ, HELLO_COMMIT_TIMEOUT_S):
        log.warning("host %s: no handshake turn for its hello; closing so that it retries", conn.host_id)
        conn.close(CLOSE_TRY_AGAIN, "server busy, try again")
        return None
    if raw is None:
        conn.close(protocol.CLOSE_POLICY, "no hello")
        return None
    try:
        env = protocol.decode(raw)
    except protocol.ProtocolError as e:
        conn.send(protocol.error_frame(e.code, e.message, e.ref))
        conn.close(protocol.CLOSE_POLICY, "first frame must be a valid hello")
        return None
    if env.type != "hello":
        conn.send(protocol.error_frame("expected_hello", f"first frame must be hello, got {env.type!r}", env.id))
        conn.close(protocol.CLOSE_POLICY, "first frame must be hello")
        return None
    return env


class RateLimiter:
    """Token bucket: ``rate`` frames a second on average, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.stamp = clock()
        self.strikes = 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


#: Frames refused for rate before the connection is closed as abusive.
MAX_RATE_STRIKES = 50


def _read_loop(conn: Connection, idle_timeout: float) -> None:
    from ..updates import watcher

    cfg = current_app.config
    limiter = RateLimiter(cfg["AGENT_MSG_RATE"], cfg["AGENT_MSG_BURST"])
    presence = runtime().presence
    while True:
        db.session.close()  # never wait on the socket inside a transaction: SQLite would stay locked
        raw = conn.ws.receive(timeout=idle_timeout)
        if raw is None:
            if not conn.ws.connected:
                return
            log.info("host %s silent for %.0f s; dropping its connection", conn.host_id, idle_timeout)
            conn.close(protocol.CLOSE_IDLE, "heartbeat timeout")
            return
        try:
            env, bad = protocol.decode(raw), None
        except protocol.ProtocolError as e:
            env, bad = None, e
        # Pongs answer the server's own pings, so the server sets their pace: never drop them.
        if (env is None or env.type != "pong") and not limiter.allow():
            limiter.strikes += 1
            count_rate_limited()
            if limiter.strikes >= MAX_RATE_STRIKES:
                log.warning("host %s keeps exceeding the frame rate; closing its connection", conn.host_id)
                conn.close(protocol.CLOSE_POLICY, "message rate exceeded")
                return
            conn.send(protocol.error_frame("rate_limited", f"more than {cfg['AGENT_MSG_RATE']:g} frames/s; dropped"))
            continue
        if bad is not None:
            log.info("host %s sent a bad frame: %s", conn.host_id, bad.message)
            conn.send(protocol.error_frame(bad.code, bad.message, bad.ref))
            continue
        t = env.type
        if t == "heartbeat":
            pass
        elif t == "pong":
            conn.pong(env.data["ref"])
        elif t == "ping":
            conn.send(protocol.encode("pong", {"ref": env.id}))
        elif t == "update.progress":
            watcher.on_progress(conn.host_id, env.data)
        elif t == "update.result":
            watcher.on_result(conn.host_id, env.data)
        elif t == "error":
            log.warning("host %s reported error %s: %s", conn.host_id, env.data["code"], env.data["message"])
        else:
            conn.send(protocol.error_frame("unexpected_type", f"{t!r} is not sent by agents", env.id))
        # last_seen is written for all hosts at once, every PRESENCE_FLUSH_S (app/agents/presence.py)
        presence.note(conn.host_id)


def _if_held_here(q):
    """Several instances: only while this instance holds the host (a newer socket may be on a peer)."""
    instance_id = runtime().instance_id
    return q if instance_id is None else q.where(Host.instance_id == instance_id)


def sweep_offline() -> int:
    """Mark hosts offline that the database thinks are connected but have no socket here."""
    live = runtime().connections.host_ids()
    q = _if_held_here(sa.update(Host).where(Host.connected.is_(True)))
    if live:
        q = q.where(Host.id.not_in(live))
    n = db.session.execute(q.values(connected=False)).rowcount or 0
    db.session.commit()
    return n
