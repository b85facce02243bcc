"""Hosts' online state written in batches (app/agents/presence.py): real server, sockets and database.

The flush interval is an hour here, so nothing is written by the clock; the test flushes by hand
(``Presence.wake``) and moves the injected wall clock to tell one write from another.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import sqlalchemy as sa

from agent import protocol
from app.extensions import db
from app.runtime import runtime
from tests.link.test_agent_link import connect, hello, host_row, recv
from tests.support.live import LiveServer
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def live(app, cast):
    app.config.update(HEARTBEAT_S=0.2, HEARTBEAT_TIMEOUT=5.0, BUILD_AGENT_ON_START=False, PRESENCE_FLUSH_S=3600)
    with LiveServer(app) as server:
        yield server


@contextlib.contextmanager
def host_updates():
    """Record every ``UPDATE hosts`` the server sends: (statement, parameter sets)."""
    seen: list[tuple[str, list]] = []

    def on_execute(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE HOSTS"):
            seen.append((statement, list(parameters) if executemany else [parameters]))

    sa.event.listen(db.engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", on_execute)


def welcomed(live, token, **over):
    ws = connect(live, token)
    ws.send(hello(**over))
    assert recv(ws).type == "welcome"
    return ws


def welcomed_with_hook(live, cast, presence, hook):
    """Welcome host_offline (hostname "from-the-hello") with ``hook`` among the hello hooks; its socket and row."""
    presence.hello_hooks.append(hook)
    try:
        ws = welcomed(live, cast.host_offline_token, hostname="from-the-hello")
    finally:
        presence.hello_hooks.remove(hook)
    return ws, host_row(cast.host_offline.id)


def read_so_far(ws):
    """Return once the server has handled every frame sent on ``ws`` so far (it answers in order)."""
    ws.send(protocol.encode("ping", {}, "sync"))
    assert recv(ws).type == "pong"


def flush_now(app):
    presence = runtime(app).presence
    before = presence.flushes
    presence.wake()
    wait_until(lambda: presence.flushes > before, what="an interval flush")


def test_the_host_is_online_in_the_database_before_its_agent_is_welcomed(live, cast):
    ws = welcomed(live, cast.host_offline_token, hostname="db-1.example")
    row = host_row(cast.host_offline.id)  # no waiting: the welcome came after the commit
    assert row.connected and row.hostname == "db-1.example"
    ws.close()


def test_heartbeats_touch_the_database_once_per_interval_in_one_statement(live, cast, app, clock):
    hosts = [(cast.host_online, cast.host_online_token), (cast.host_offline, cast.host_offline_token)]
    sockets = [welcomed(live, token) for _, token in hosts]
    hello_seen = {h.id: host_row(h.id).last_seen for h, _ in hosts}
    clock.advance(60)
    with host_updates() as updates:
        for _ in range(3):
            for ws in sockets:
                ws.send(protocol.encode("heartbeat"))
        for ws in sockets:
            read_so_far(ws)
        assert updates == []  # the frames were read, yet nothing was written
        assert {h.id: host_row(h.id).last_seen for h, _ in hosts} == hello_seen

        flush_now(app)

    assert len(updates) == 1, updates  # six heartbeats from two hosts: one statement
    statement, params = updates[0]
    assert "IN" in statement.upper() and len(params) == 1
    for host, _ in hosts:
        row = host_row(host.id)
        assert row.last_seen == clock.now() and row.connected
    for ws in sockets:
        ws.close()


def test_hellos_that_arrive_together_are_committed_together(live, cast, app):
    presence = runtime(app).presence
    hosts = [(cast.host_online, cast.host_online_token), (cast.host_offline, cast.host_offline_token)]
    hosts.append((cast.host_behind, cast.host_behind_token))
    db.session.execute(sa.update(db.metadata.tables["hosts"]).values(connected=False))
    db.session.commit()
    sockets = []
    with host_updates() as updates:
        with presence.writing():  # the writer waits here, as behind a slow commit
            for i, (_, token) in enumerate(hosts):
                ws = connect(live, token)
                ws.send(hello(hostname=f"group-{i}"))
                sockets.append(ws)
            wait_until(lambda: presence.queued_hellos == len(hosts), what="three hellos queued")
            # no welcome while the hellos wait for their commit
            assert all(ws.receive(timeout=0.2) is None for ws in sockets)
            assert not any(host_row(h.id).connected for h, _ in hosts)
        for ws in sockets:
            assert recv(ws).type == "welcome"

    hello_writes = [(s, p) for s, p in updates if "hostname" in s]
    assert len(hello_writes) == 1, updates  # one statement, executed for the three hosts
    assert len(hello_writes[0][1]) == len(hosts)
    for i, (host, _) in enumerate(hosts):
        row = host_row(host.id)
        assert row.connected and row.hostname == f"group-{i}"
    for ws in sockets:
        ws.close()


def test_a_heartbeat_flush_never_brings_a_revoked_host_back_online(live, cast, app):
    host_id = cast.host_online.id
    ws = welcomed(live, cast.host_online_token)
    ws.send(protocol.encode("heartbeat"))
    read_so_far(ws)
    # The revoke commits while its socket is still registered here: the flush sees a live host.
    host = host_row(host_id)
    assert host.connected
    host.revoke()
    db.session.commit()
    assert runtime(app).connections.is_connected(host_id)
    flush_now(app)
    assert not host_row(host_id).connected
    runtime(app).connections.close(host_id, protocol.CLOSE_REVOKED, "revoked")
    wait_until(lambda: not ws.connected, what="the revoked agent's socket closed")


def test_disconnects_are_written_offline_and_a_stop_writes_all_in_one_statement(app, cast):
    app.config.update(HEARTBEAT_S=0.2, HEARTBEAT_TIMEOUT=5.0, BUILD_AGENT_ON_START=False, PRESENCE_FLUSH_S=3600)
    server = LiveServer(app)
    with server:
        a = welcomed(server, cast.host_online_token)
        b = welcomed(server, cast.host_offline_token)
        c = welcomed(server, cast.host_behind_token)
        a.close()
        wait_until(lambda: not host_row(cast.host_online.id).connected, what="a closed socket written offline")
        assert host_row(cast.host_offline.id).connected
        with host_updates() as updates:
            server.servers.stop()
    assert [h.connected for h in map(host_row, (cast.host_offline.id, cast.host_behind.id))] == [False, False]
    # (several instances on PostgreSQL: the instance's own deregistration is a statement of its own)
    offline = [s for s, _ in updates if "connected" in s and "last_seen" in s]
    assert len(offline) == 1, updates
    for ws in (b, c):
        wait_until(lambda ws=ws: not ws.connected, what="closed by the stop")


def test_a_hello_that_cannot_be_written_closes_the_socket_so_the_agent_retries(live, cast, app):
    presence = runtime(app).presence
    failed = threading.Event()

    def broken_hook(session, now):  # the next interval flush fails, as a database error would
        failed.set()
        raise RuntimeError("database is gone")

    presence.flush_hooks.append(broken_hook)
    with presence.writing():
        presence.wake()
        ws = connect(live, cast.host_offline_token)
        ws.send(hello())
        wait_until(lambda: presence.queued_hellos == 1, what="the hello queued")
    assert failed.wait(5)
    presence.flush_hooks.remove(broken_hook)
    wait_until(lambda: not ws.connected, what="the socket closed")
    assert ws.close_reason == 1013
    assert not host_row(cast.host_offline.id).connected


def test_queued_reports_are_written_together_with_the_next_transaction(live, cast, app):
    presence = runtime(app).presence
    batches = []
    with presence.writing():  # the writer waits here, as behind a slow commit: the items gather
        for i in range(3):
            presence.queue(batches.append, i)
    wait_until(lambda: batches, what="the queued items written")
    assert batches == [[0, 1, 2]]  # one call, in the order queued


def test_a_batch_that_cannot_be_written_is_tried_once_more_then_dropped_and_hellos_go_on(live, cast, app):
    presence = runtime(app).presence
    calls = []

    def broken(items):
        calls.append(list(items))
        raise RuntimeError("cannot write these")

    with presence.writing():
        presence.queue(broken, "report")
    wait_until(lambda: len(calls) == 2, what="the batch tried twice")
    ws = welcomed(live, cast.host_offline_token)  # the writer goes on: hellos are recorded
    assert host_row(cast.host_offline.id).connected
    assert calls == [["report"], ["report"]]
    ws.close()


def test_a_failing_hello_hook_is_rolled_back_and_the_hello_still_recorded(live, cast, app):
    presence = runtime(app).presence
    seen = []

    def broken_hook(hellos):
        seen.extend(h for h, _ in hellos)
        db.session.execute(sa.update(db.metadata.tables["hosts"]).values(hostname="written-by-the-hook"))
        raise RuntimeError("the hook fails after a write")

    ws, row = welcomed_with_hook(live, cast, presence, broken_hook)
    assert seen == [cast.host_offline.id]
    assert row.connected and row.hostname == "from-the-hello"  # the hook's write was rolled back
    ws.close()


def test_a_hello_hook_whose_read_fails_is_left_out_and_the_hello_still_recorded(live, cast, app):
    presence = runtime(app).presence
    ran = []

    def hook(hellos):
        ran.append(hellos)

    def broken_read(hellos):
        db.session.execute(sa.text("SELECT * FROM no_such_table"))  # aborts a PostgreSQL transaction

    hook.select = broken_read
    ws, row = welcomed_with_hook(live, cast, presence, hook)
    assert ran == []  # left out of the batch its read failed for
    assert row.connected and row.hostname == "from-the-hello"
    ws.close()


def test_a_storm_hello_costs_no_savepoint_and_no_statement_on_its_connection(live, cast, app):
    """A hello with no running job and no open alert (every host of a reconnect storm): the writer's
    batch reads once for it and opens no savepoint; the connection's own reconcile sends nothing."""
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append((threading.current_thread().name, statement.split()[0].upper()))

    engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        ws = welcomed(live, cast.host_offline_token)
        wait_until(lambda: runtime(app).connections.get(cast.host_offline.id).settled.is_set())
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    writer = [s for t, s in statements if t == "presence-writer"]
    assert "SAVEPOINT" not in writer and "UPDATE" in writer
    assert [s for t, s in statements if t.startswith("Thread-") and "process_request" in t] == ["SELECT"]  # the token
    ws.close()


def test_a_lone_hello_is_written_at_once_and_a_stream_of_them_in_gathered_batches(app, cast, monkeypatch):
    """Idle, a hello is written as it comes; right after one (a storm), the writer lets the batch
    gather. The linger is made long and the batch bound short, so that the batch's end is the
    bound, not a race with the clock."""
    from app.agents import presence as presence_module
    from app.agents.presence import HELLO_COLUMNS, Presence

    monkeypatch.setattr(presence_module, "HELLO_LINGER_S", 30.0)
    monkeypatch.setattr(presence_module, "MAX_LINGER_BATCH", 3)
    presence = Presence(live=lambda h: True, interval_s=3600)
    batches = []
    presence.hello_hooks.append(lambda hellos: batches.append(sorted(h for h, _ in hellos)))
    values = {c: None for c in HELLO_COLUMNS}
    hosts = [cast.host_online.id, cast.host_offline.id, cast.host_behind.id]
    presence.start(app)
    try:
        assert presence.hello(hosts[0], values, timeout=10)  # idle: not held for the 30 s linger
        assert batches == [[hosts[0]]]
        results = []
        threads = [
            threading.Thread(target=lambda h=h: results.append(presence.hello(h, values, timeout=20))) for h in hosts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(25)
        assert results == [True] * 3
        assert batches == [[hosts[0]], sorted(hosts)]  # one batch: the bound, not the linger, ended it
    finally:
        presence.stop()


def test_a_late_hello_does_not_take_a_host_back_from_a_peer_with_a_newer_claim(app, cast, monkeypatch):
    """Several instances: an agent gave up on a slow welcome here and reconnected to a peer, whose
    hello committed first. This instance's late hello (it arrived before the peer wrote its claim)
    must leave the host with the peer; a hello that arrived after the peer's claim takes it over."""
    import datetime as dt

    from app.agents import presence as presence_module
    from app.agents.presence import HELLO_COLUMNS, Presence, _Hello
    from app.timeutil import utcnow

    hosts = db.metadata.tables["hosts"]
    now = utcnow()
    for iid in (901, 902):
        db.session.execute(
            sa.text(
                "INSERT INTO instances (id, name, pid, agent_addr, started_at, heartbeat_at) "
                "VALUES (:id, :name, 1, '127.0.0.1:1', :now, :now)"
            ),
            {"id": iid, "name": f"i{iid}", "now": now},
        )
    host = cast.host_offline.id
    claimed_at = now - dt.timedelta(seconds=1)
    db.session.execute(
        sa.update(hosts).where(hosts.c.id == host).values(connected=True, instance_id=902, last_seen=claimed_at)
    )
    db.session.commit()
    monkeypatch.setattr(presence_module, "_held_here", lambda: {"instance_id": 901})
    presence = Presence(live=lambda h: True, interval_s=3600)
    values = {c: None for c in HELLO_COLUMNS}

    late = _Hello(host, values, at=claimed_at - dt.timedelta(seconds=5))
    with app.app_context():
        presence._write([late], {}, set(), set(), set(), False)
    row = db.session.execute(sa.select(hosts.c.instance_id, hosts.c.connected).where(hosts.c.id == host)).one()
    assert (row.instance_id, row.connected) == (902, True)  # the peer keeps it

    # The claim is the peer's hello's arrival, not its commit: a peer's late commit of an older
    # hello (its agent gave up there and came here) does not keep the host there.
    db.session.execute(sa.update(hosts).where(hosts.c.id == host).values(instance_id=902, last_seen=claimed_at))
    db.session.commit()
    newer = _Hello(host, values, at=claimed_at + dt.timedelta(seconds=5))
    with app.app_context():
        presence._write([newer], {}, set(), set(), set(), False)
    db.session.close()
    row = db.session.execute(sa.select(hosts.c.instance_id, hosts.c.connected).where(hosts.c.id == host)).one()
    assert (row.instance_id, row.connected) == (901, True)  # a hello after the peer's claim moves it here
    later_peer = _Hello(host, values, at=claimed_at + dt.timedelta(seconds=2))  # older than 901's hello
    monkeypatch.setattr(presence_module, "_held_here", lambda: {"instance_id": 902})
    with app.app_context():
        presence._write([later_peer], {}, set(), set(), set(), False)
    db.session.close()
    row = db.session.execute(sa.select(hosts.c.instance_id, hosts.c.connected).where(hosts.c.id == host)).one()
    assert (row.instance_id, row.connected) == (901, True)  # committed last, but its hello came first
