"""Several ``serve`` processes on one PostgreSQL database: instances, routing, one scheduler leader.

SQLite never reaches this module: ``Servers.start`` builds a :class:`Cluster` only when the database
is PostgreSQL (:func:`enabled`). Then this process

- registers itself as an **instance** (a row in ``instances``) and beats its heartbeat every
  ``INSTANCE_HEARTBEAT_S`` on the database's clock; a host's ``instance_id`` names the instance that
  holds its socket;
- **routes** what must happen on another instance's socket through ``LISTEN/NOTIFY``: the payload
  is an id (a job, a ping), the rows stay the truth. A ``command.update`` is notified inside the
  dispatch's own transaction, so it is sent only if the job exists; the holder reads the job row
  and sends the frame. Link closes (revoke, delete) and fleet wake-ups are broadcast;
- competes for **leadership** with ``pg_try_advisory_lock`` on a dedicated connection: only the
  leader runs the scheduler's jobs (timeout sweep, rollout ticks) and the sweep that deletes
  instances whose heartbeat expired and sets their hosts offline. The lock lives as long as that
  connection: a dead leader's lock is released by the server, and a follower takes it at its next
  try (every heartbeat).

When PostgreSQL restarts, every dedicated connection breaks: the listener reconnects and listens
again, then re-sends the ``command.update`` of every running job still waiting for delivery on a
host it holds (a notification may have been lost; the agent ignores a job it already has); the
heartbeat re-registers the instance if a leader deleted it meanwhile and claims its hosts again;
leadership is competed for afresh. See docs/architecture.md#several-instances.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from functools import partial

import sqlalchemy as sa
from flask import Flask

from .agents.registry import ConnectionRegistry
from .extensions import db
from .runtime import Waker, runtime

log = logging.getLogger(__name__)

#: The database's UTC clock: instances on several machines compare heartbeats on one clock.
DB_NOW = "timezone('UTC', clock_timestamp())"
ALIVE = f"i.heartbeat_at >= {DB_NOW} - make_interval(secs => :expiry)"
#: The row of host ``:host`` if a live instance holds its socket.
HELD = f"FROM hosts h JOIN instances i ON i.id = h.instance_id WHERE h.id = :host AND h.connected AND {ALIVE}"


def enabled(app: Flask) -> bool:
    """Several instances are possible only on PostgreSQL; SQLite stays one process."""
    return str(app.config["SQLALCHEMY_DATABASE_URI"]).startswith("postgresql")


def _dsn(app: Flask) -> str:
    url = sa.engine.make_url(app.config["SQLALCHEMY_DATABASE_URI"]).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _read_one(conn, sql: str, params: dict):
    """The first row of one statement on the listener's own (autocommit) connection: one round trip."""
    return conn.execute(sql, params).fetchone()


class ClusterConnections(ConnectionRegistry):
    """The registry of this process's sockets; "connected" also counts a socket on a live peer instance."""

    def __init__(self, cluster: Cluster):
        super().__init__()
        self.cluster = cluster

    def is_connected(self, host_id: int) -> bool:
        return super().is_connected(host_id) or self.cluster.holder(host_id) is not None


#: More waited-for hosts than this are broadcast as "*" (NOTIFY payloads are limited to 8000 bytes).
WAITING_LIST_MAX = 500


def encode_waiting(host_ids: frozenset[int]) -> str:
    """The ``waiting`` notification's text: ``0`` (none), ``3,7,9``, or ``*`` (too many: every hello)."""
    if len(host_ids) > WAITING_LIST_MAX:
        return "*"
    return ",".join(map(str, sorted(host_ids))) or "0"


def decode_waiting(text: str) -> frozenset[int] | None:
    if text.strip() == "*":
        return None
    return frozenset(i for i in (int(x) for x in text.split(",") if x.strip()) if i)


class ClusterWaker(Waker):
    """The fleet tick's wake-ups across instances: the leader ticks; a follower notifies the leader.

    ``waiting_for`` (set by the leader's tick: the offline hosts the rollout waits for) is
    broadcast when it changes, so a follower forwards only the hellos of those hosts, not every
    hello of a reconnect storm.
    """

    def __init__(self, job_id: str, scheduler, cluster: Cluster):
        self.cluster = cluster
        self._waiting: frozenset[int] = frozenset()
        super().__init__(job_id, scheduler)

    @property
    def waiting_for(self) -> frozenset[int]:
        return self._waiting

    @waiting_for.setter
    def waiting_for(self, host_ids) -> None:
        host_ids = frozenset(host_ids or ())
        changed = host_ids != self._waiting
        self._waiting = host_ids
        if changed and getattr(self, "cluster", None) is not None and self.cluster.leader:
            self.cluster.broadcast("waiting", encode_waiting(host_ids))

    def wake(self) -> None:
        if self.cluster.leader:
            super().wake()
        else:
            self.cluster.broadcast("wake")

    def wake_for(self, host_id: int) -> None:
        if self.cluster.leader:
            super().wake_for(host_id)
        elif self.cluster.remote_waiting is None or host_id in self.cluster.remote_waiting:
            self.cluster.broadcast("hello", host_id)

    def local_wake(self) -> None:
        Waker.wake(self)


class Cluster:
    """This process as one instance of several (see the module)."""

    def __init__(self, app: Flask, name: str | None = None):
        self.app = app
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat_s = float(app.config["INSTANCE_HEARTBEAT_S"])
        self.expiry_s = float(app.config["INSTANCE_EXPIRY_S"])
        self.id: int | None = None
        self.leader = False
        # The hosts the leader's rollout waits for; None: too many to list, forward every hello.
        self.remote_waiting: frozenset[int] | None = frozenset()
        self._dsn = _dsn(app)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_conn = None  # psycopg connection holding the advisory lock (or trying to)
        self._pings: dict[str, tuple[threading.Event, list]] = {}
        self._pings_lock = threading.Lock()
        self.listening = threading.Event()  # set while the listener is connected and listening
        self.on_leadership: list = []  # callbacks (no arguments) run when this instance becomes leader
        self._key = 0
        self._prefix = ""

    # --- start / stop --------------------------------------------------------------------------

    def install(self) -> None:
        """Replace the runtime's single-process parts by their cluster versions (before any socket)."""
        from .updates.inflight import InFlightRegistry

        rt = runtime(self.app)
        rt.cluster = self
        rt.connections = ClusterConnections(self)
        rt.inflight = InFlightRegistry(cached=False)
        rt.fleet_waker = ClusterWaker(rt.fleet_waker.job_id, lambda: rt.scheduler, self)

    def start(self) -> None:
        """Register this instance and start the heartbeat/leadership and listener threads."""
        with self.app.app_context():
            schema = db.session.scalar(sa.text("SELECT current_database() || '.' || current_schema()"))
            digest = hashlib.sha256(f"restic-manager:{schema}".encode()).hexdigest()
            # One lock and one set of channels per database and schema: two fleets on one server don't mix.
            self._key = int(digest[:15], 16)
            self._prefix = "rm_" + digest[:16]
            self.id = db.session.scalar(
                sa.text(
                    f"INSERT INTO instances (name, pid, agent_addr, started_at, heartbeat_at) "
                    f"VALUES (:name, :pid, :addr, {DB_NOW}, {DB_NOW}) RETURNING id"
                ),
                {"name": self.name[:255], "pid": os.getpid(), "addr": self._agent_addr()},
            )
            db.session.commit()
            db.session.remove()
        runtime(self.app).instance_id = self.id
        log.info("instance %s registered as %s", self.id, self.name)
        for name, target in (("instance-heartbeat", self._heartbeat_loop), ("instance-listener", self._listen_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.listening.wait(5.0)

    def _agent_addr(self) -> str:
        host, port = self.app.config["AGENT_ADDR"]
        return f"{host}:{port}"

    def stop(self) -> None:
        """Leave: release the lock, set this instance's hosts offline, delete its row."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._drop_lock_conn()
        self.leader = False
        if self.id is None:
            return
        with self.app.app_context():
            try:
                db.session.execute(
                    sa.text("UPDATE hosts SET connected = false, instance_id = NULL WHERE instance_id = :id"),
                    {"id": self.id},
                )
                db.session.execute(sa.text("DELETE FROM instances WHERE id = :id"), {"id": self.id})
                db.session.commit()
            except sa.exc.SQLAlchemyError:  # the database is gone: the survivors' sweep expires us
                log.warning("could not deregister instance %s", self.id, exc_info=True)
                db.session.rollback()
            finally:
                db.session.remove()

    # --- reads used by the routing --------------------------------------------------------------

    def holder(self, host_id: int) -> int | None:
        """The live peer instance holding ``host_id``'s socket (not this one), or None."""
        found = db.session.scalar(sa.text(f"SELECT h.instance_id {HELD}"), {"host": host_id, "expiry": self.expiry_s})
        return found if found is not None and found != self.id else None

    def route(self, host_id: int, verb: str, *args) -> bool:
        """Notify the peer holding ``host_id`` (inside the caller's transaction); False if none does.

        One statement finds the holder and notifies its channel: a dispatch's commit is all that
        stands between the API call and the peer's listener.
        """
        held = db.session.execute(
            sa.text(
                f"SELECT h.instance_id, pg_notify(:channel || h.instance_id, :payload) {HELD} AND h.instance_id <> :me"
            ),
            {
                "host": host_id,
                "expiry": self.expiry_s,
                "me": self.id,
                "channel": f"{self._prefix}_",
                "payload": self._payload(verb, *args),
            },
        ).first()
        return held is not None

    # --- notifications --------------------------------------------------------------------------

    def _channel(self, instance_id: int | None = None) -> str:
        return f"{self._prefix}_{instance_id}" if instance_id is not None else f"{self._prefix}_all"

    def _payload(self, verb: str, *args) -> str:
        return " ".join([verb, str(self.id), *(str(a) for a in args)])

    def notify(self, channel: str, verb: str, *args) -> None:
        """Send one notification now, in its own short transaction (never the caller's)."""
        try:
            with self.app.app_context(), db.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": self._payload(verb, *args)})
        except sa.exc.SQLAlchemyError:
            log.warning("could not notify %s %s", channel, verb, exc_info=True)

    def broadcast(self, verb: str, *args) -> None:
        self.notify(self._channel(), verb, *args)

    def ping(self, host_id: int, timeout: float) -> tuple[bool, float | None]:
        """Ping ``host_id`` on the peer holding it: (a peer holds it, round trip in s or None)."""
        peer = self.holder(host_id)
        db.session.close()  # don't hold a database connection while waiting on the network
        if peer is None:
            return False, None
        cmd = uuid.uuid4().hex
        ev, box = threading.Event(), []
        with self._pings_lock:
            self._pings[cmd] = (ev, box)
        try:
            self.notify(self._channel(peer), "ping", cmd, host_id, timeout)
            # the peer answers "offline" at once, else the round trip ("-": none) within the timeout
            if not ev.wait(timeout + 1.0):
                return True, None
            if box[0] == "offline":
                return False, None
            return True, (None if box[0] == "-" else float(box[0]) / 1000.0)
        finally:
            with self._pings_lock:
                self._pings.pop(cmd, None)

    # --- the heartbeat and leadership thread ----------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - top of a long-running loop: log and go on
                log.warning("instance %s heartbeat failed", self.id, exc_info=True)
            try:
                self._lead()
            except Exception:  # noqa: BLE001 - the lock connection broke: not the leader any more
                if self.leader:
                    log.warning("instance %s lost the scheduler leadership", self.id, exc_info=True)
                self.leader = False
                self._drop_lock_conn()
            if self.leader:
                try:
                    self.sweep_expired()
                except Exception:  # noqa: BLE001
                    log.warning("expired-instance sweep failed", exc_info=True)

    def beat(self) -> None:
        """Renew this instance's heartbeat; re-register and re-claim its hosts if a sweep deleted it."""
        with self.app.app_context():
            try:
                n = db.session.execute(
                    sa.text(f"UPDATE instances SET heartbeat_at = {DB_NOW} WHERE id = :id"), {"id": self.id}
                ).rowcount
                if not n:
                    log.warning("instance %s had expired (database unreachable?); registering again", self.id)
                    db.session.execute(
                        sa.text(
                            f"INSERT INTO instances (id, name, pid, agent_addr, started_at, heartbeat_at) "
                            f"VALUES (:id, :name, :pid, :addr, {DB_NOW}, {DB_NOW})"
                        ),
                        {"id": self.id, "name": self.name[:255], "pid": os.getpid(), "addr": self._agent_addr()},
                    )
                    self._claim_local_hosts()
                db.session.commit()
            except sa.exc.SQLAlchemyError:
                db.session.rollback()
                raise
            finally:
                db.session.remove()

    def _claim_local_hosts(self) -> None:
        ids = sorted(runtime(self.app).connections.host_ids())
        if not ids:
            return
        db.session.execute(
            sa.text(
                "UPDATE hosts SET connected = true, instance_id = :me "
                "WHERE id IN :ids AND revoked_at IS NULL AND (instance_id IS NULL OR instance_id = :me)"
            ).bindparams(sa.bindparam("ids", expanding=True)),
            {"me": self.id, "ids": ids},
        )

    def _lead(self) -> None:
        import psycopg

        if self._lock_conn is None:
            self._lock_conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=3, keepalives=1, keepalives_idle=5, keepalives_interval=2
            )
        if self.leader:
            self._lock_conn.execute("SELECT 1")  # the lock lives as long as this connection
            return
        got = self._lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()[0]
        if got:
            self.leader = True
            log.info("instance %s is the scheduler leader", self.id)
            for fn in list(self.on_leadership):
                fn()

    def _drop_lock_conn(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def sweep_expired(self) -> int:
        """Delete instances whose heartbeat expired and set their hosts offline; return how many hosts."""
        with self.app.app_context():
            try:
                hosts = db.session.execute(
                    sa.text(
                        f"WITH dead AS (DELETE FROM instances WHERE heartbeat_at < {DB_NOW} - "
                        f"make_interval(secs => :expiry) AND id <> :me RETURNING id) "
                        "UPDATE hosts SET connected = false, instance_id = NULL "
                        "WHERE instance_id IN (SELECT id FROM dead) RETURNING id"
                    ),
                    {"expiry": self.expiry_s, "me": self.id},
                ).all()
                db.session.commit()
            finally:
                db.session.remove()
        if hosts:
            log.warning("an instance expired: %d of its hosts set offline", len(hosts))
            runtime(self.app).fleet_waker.wake()
        return len(hosts)

    # --- the listener thread --------------------------------------------------------------------

    def _listen_loop(self) -> None:
        import psycopg

        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=3,
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                ) as conn:
                    conn.execute(f'LISTEN "{self._channel()}"')
                    conn.execute(f'LISTEN "{self._channel(self.id)}"')
                    self.listening.set()
                    if not first:
                        log.info("instance %s listens again", self.id)
                        self._after_relisten()
                    first = False
                    while not self._stop.is_set():
                        # notifies() blocks on the connection's socket (no polling) and holds the
                        # connection while it runs: take what arrived, then handle it, so that a
                        # handler may read on this connection (what arrives meanwhile is kept).
                        for n in list(conn.notifies(timeout=0.5, stop_after=1)):
                            self._handle(n.payload, conn)
            except psycopg.Error:
                self.listening.clear()
                if not self._stop.is_set():
                    log.warning("instance %s lost its listening connection; reconnecting", self.id)
                    self._stop.wait(0.5)

    def _after_relisten(self) -> None:
        """Notifications sent while we were not listening are lost: the rows are the truth, read them."""
        with self.app.app_context():
            try:
                ids = sorted(runtime(self.app).connections.host_ids())
                jobs = []
                if ids:
                    jobs = db.session.scalars(
                        sa.text(
                            "SELECT id FROM jobs WHERE kind = 'update' AND status = 'running' "
                            "AND phase = 'dispatched' AND host_id IN :ids"
                        ).bindparams(sa.bindparam("ids", expanding=True)),
                        {"ids": ids},
                    ).all()
                db.session.remove()
                for job_id in jobs:
                    runtime(self.app).update_routed.publish(job_id)
            except sa.exc.SQLAlchemyError:
                log.warning("re-reading undelivered jobs failed", exc_info=True)
            finally:
                db.session.remove()
        if self.leader:
            runtime(self.app).fleet_waker.local_wake()

    def _handle(self, payload: str, conn=None) -> None:
        parts = payload.split(" ", 2)
        if len(parts) < 2:
            return
        verb, sender, rest = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
        if verb in ("cut", "wake", "hello", "waiting") and sender == str(self.id):
            return  # our own broadcast
        rt = runtime(self.app)
        try:
            if verb == "update":
                with self.app.app_context():
                    try:
                        rt.update_routed.publish(rest, None if conn is None else partial(_read_one, conn))
                    finally:
                        db.session.remove()
            elif verb == "ping":
                threading.Thread(target=self._answer_ping, args=(sender, rest), daemon=True).start()
            elif verb == "pong":
                cmd, _, value = rest.partition(" ")
                with self._pings_lock:
                    waiting = self._pings.get(cmd)
                if waiting is not None:
                    waiting[1].append(value)
                    waiting[0].set()
            elif verb == "cut":
                host, code, message = rest.split(" ", 2)
                rt.connections.close(int(host), int(code), message)
                rt.downloads.abort(int(host), message)
            elif verb == "wake" and self.leader:
                rt.fleet_waker.local_wake()
            elif verb == "hello" and self.leader:
                Waker.wake_for(rt.fleet_waker, int(rest))
            elif verb == "waiting":
                self.remote_waiting = decode_waiting(rest)
        except Exception:  # noqa: BLE001 - one bad notification must not stop the listener
            log.warning("could not handle notification %r", payload, exc_info=True)

    def _answer_ping(self, sender: str, rest: str) -> None:
        cmd, host, timeout = rest.split(" ")
        conn = runtime(self.app).connections.get(int(host))
        if conn is None:
            answer = "offline"
        else:
            rtt = conn.ping(float(timeout))
            answer = "-" if rtt is None else f"{rtt * 1000.0:.3f}"
        self.notify(self._channel(int(sender)), "pong", cmd, answer)
