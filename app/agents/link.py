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
from ..timeutil import utcnow
from .registry import Connection

log = logging.getLogger(__name__)

#: How long a fresh socket may take to send its hello.
HELLO_TIMEOUT_S = 10.0


def serve_connection(ws, host_id: int, remote: str) -> None:
    """Run one authenticated agent socket until it closes."""
    conn = Connection(host_id, ws, remote)
    cfg = current_app.config
    hello = _await_hello(conn)
    if hello is None:
        return
    data = hello.data
    conn.agent_version = data["agent_version"]
    conn.update_unavailable = data.get("update_unavailable")
    old = runtime().connections.register(conn)
    if old is not None:
        log.info("host %s reconnected from %s; closing its previous connection", host_id, remote)
        old.close(protocol.CLOSE_REPLACED, "replaced by a newer connection")
    try:
        record_hello(host_id, data)
        conn.send(
            protocol.encode(
                "welcome",
                # host_id binds the agent's commands to it: it refuses a command.update for another host
                {"server_version": cfg["SERVER_VERSION"], "heartbeat_s": cfg["HEARTBEAT_S"], "host_id": host_id},
            )
        )
        from ..updates import fleet, watcher

        watcher.on_hello(host_id, data)
        fleet.host_connected(host_id)
        _read_loop(conn, cfg["HEARTBEAT_TIMEOUT"], touch_every=max(1.0, cfg["HEARTBEAT_S"] / 2))
    except ConnectionClosed:
        pass
    finally:
        # Offline unless a newer connection took over. A revoke pops this connection from the
        # registry itself, so "was it still mine" is not the test: "is anyone live now" is.
        runtime().connections.unregister(conn)
        if runtime().connections.get(host_id) is None:
            mark_offline(host_id)
        db.session.close()


def _await_hello(conn: Connection) -> protocol.Envelope | None:
    try:
        raw = conn.ws.receive(timeout=HELLO_TIMEOUT_S)
    except ConnectionClosed:
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


def _read_loop(conn: Connection, idle_timeout: float, touch_every: float) -> None:
    from ..updates import watcher

    cfg = current_app.config
    limiter = RateLimiter(cfg["AGENT_MSG_RATE"], cfg["AGENT_MSG_BURST"])
    last_touch = time.monotonic()
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
        # After the frame is handled: a pong must not wait behind a database write.
        now = time.monotonic()
        if now - last_touch >= touch_every:
            touch(conn)
            last_touch = now


def _held_here() -> dict:
    """Several instances: the host row also names this instance as the one holding its socket."""
    instance_id = runtime().instance_id
    return {} if instance_id is None else {"instance_id": instance_id}


def _if_held_here(q):
    """Several instances: only while this instance holds the host (a newer socket may be on a peer)."""
    instance_id = runtime().instance_id
    return q if instance_id is None else q.where(Host.instance_id == instance_id)


def record_hello(host_id: int, data: dict) -> None:
    """Store what the agent said about itself and mark it online (the protocol bounds every field)."""
    db.session.execute(
        sa.update(Host)
        .where(Host.id == host_id)
        .values(
            agent_version=data["agent_version"],
            os=data["os"],
            arch=data["arch"],
            hostname=data["hostname"],
            python=data["python"],
            platform=data.get("platform") or None,
            capabilities=data["capabilities"],
            boot_id=data["boot_id"],
            connected=True,
            last_seen=utcnow(),
            **_held_here(),
        )
    )
    db.session.commit()


def touch(conn: Connection) -> None:
    """Record that the host was seen; re-assert "online" only while this is its live connection.

    A revoke (or a newer connection) may have taken this one out of the registry a moment ago;
    a late heartbeat on it must not mark the host online again.
    """
    values = {"last_seen": utcnow()}
    if runtime().connections.get(conn.host_id) is conn:
        values["connected"] = True
        values.update(_held_here())
    db.session.execute(sa.update(Host).where(Host.id == conn.host_id).values(**values))
    db.session.commit()


def mark_offline(host_id: int) -> None:
    q = _if_held_here(sa.update(Host).where(Host.id == host_id))
    db.session.execute(q.values(connected=False, last_seen=utcnow()))
    db.session.commit()


def sweep_offline() -> int:
    """Mark hosts offline that the database thinks are connected but have no socket here."""
    live = runtime().connections.host_ids()
    q = _if_held_here(sa.update(Host).where(Host.connected.is_(True)))
    if live:
        q = q.where(Host.id.not_in(live))
    n = db.session.execute(q.values(connected=False)).rowcount or 0
    db.session.commit()
    return n
