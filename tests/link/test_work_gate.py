"""The agent plane's work gate: at most N connections of a process do handshake work at once
(app/agents/server.py, WorkGate; issue 13). Unit tests of the gate, then over real sockets."""

from __future__ import annotations

import socket
import threading

import pytest

from agent import protocol
from app.agents.server import QUEUE_BUDGET_S, WelcomeRate, WorkGate, restart_spread
from tests.link.test_link_hygiene import hello_frame
from tests.support.live import LiveServer
from tests.support.rawws import OP_TEXT, RawWebSocket
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)


def _waiters(cond: threading.Condition) -> int:
    return len(cond._waiters)  # CPython's Condition keeps its sleepers here


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _waiting(gate: WorkGate, resuming: bool = False) -> tuple[threading.Thread, list]:
    """A thread asleep at the gate (new, or back for its second stretch); its result once it has a turn."""
    cond = gate._resume if resuming else gate._new
    before = _waiters(cond)
    t, out = _in_thread(lambda: gate.acquire(10, resuming=resuming))
    wait_until(lambda: _waiters(cond) == before + 1, what="the waiter to sleep")
    return t, out


def test_the_gate_admits_its_size_and_no_more():
    gate = WorkGate(2)
    assert gate.acquire(0) and gate.acquire(0)
    assert gate.busy == 2
    assert not gate.acquire(0.01)  # the third waits out its timeout
    gate.release()
    assert gate.acquire(0) and gate.busy == 2


def test_a_released_turn_wakes_one_waiter_and_a_started_handshake_goes_before_a_new_one():
    gate = WorkGate(1)
    assert gate.acquire(0)
    new, new_out = _waiting(gate)
    resumed, resumed_out = _waiting(gate, resuming=True)
    gate.release()
    resumed.join(5)
    assert resumed_out == [True] and new_out == []  # the new one still waits
    gate.release()
    new.join(5)
    assert new_out == [True] and gate.busy == 1


def test_a_resuming_waiter_that_times_out_passes_a_free_turn_on():
    gate = WorkGate(1)
    assert gate.acquire(0)
    # A resuming waiter holds new ones back; when it gives up, they must not sleep on a free turn.
    new, new_out = _waiting(gate)
    assert not gate.acquire(0.05, resuming=True)
    gate.release()
    new.join(5)
    assert new_out == [True]


@pytest.fixture
def gated(app, cast):
    app.config["BUILD_AGENT_ON_START"] = False
    app.config["AGENT_MAX_ACTIVE"] = 1
    app.config["AGENT_HANDSHAKE_TIMEOUT_S"] = 1.0
    with LiveServer(app) as server:
        yield server


def _upgrade_request(token: str) -> bytes:
    return f"GET /ws/agent HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def _welcomed(ws: RawWebSocket) -> bool:
    ws.send_text(hello_frame())
    op, payload = ws.recv_frame(5)
    return op == OP_TEXT and protocol.decode(payload.decode()).type == "welcome"


def test_an_agent_whose_hello_is_on_the_way_holds_no_turn(gated, cast):
    """With one turn, a connection upgraded but still waiting for its hello (a slow network) must
    not keep the next agent from its handshake and welcome."""
    port = gated.servers.agent_port
    gate = gated.servers.agent.gate
    slow = RawWebSocket(port, cast.host_offline_token)
    assert slow.status == 101
    wait_until(lambda: gate.busy == 0, what="the turn to be handed back during the hello wait")
    fast = RawWebSocket(port, cast.host_online_token)
    assert fast.status == 101 and _welcomed(fast)
    assert _welcomed(slow)
    wait_until(lambda: gate.busy == 0, what="both welcomed agents to hand their turns back")
    fast.close()
    slow.close()


def test_a_connection_that_waits_past_its_deadline_for_a_turn_is_closed_unanswered(gated, cast):
    gate = gated.servers.agent.gate
    assert gate.acquire(0)  # the only turn is taken (a burst of handshakes)
    try:
        with socket.create_connection(("127.0.0.1", gated.servers.agent_port), timeout=5) as s:
            s.sendall(_upgrade_request(cast.host_offline_token))
            assert s.recv(65536) == b""  # closed at its handshake deadline (1 s), nothing answered
        assert gate.busy == 1
    finally:
        gate.release()
    ws = RawWebSocket(gated.servers.agent_port, cast.host_offline_token)  # a free turn serves again
    assert ws.status == 101 and _welcomed(ws)
    ws.close()


def test_an_agent_that_gave_up_while_waiting_for_a_turn_hands_it_back(gated, cast):
    gate = gated.servers.agent.gate
    assert gate.acquire(0)
    try:
        s = socket.create_connection(("127.0.0.1", gated.servers.agent_port), timeout=5)
        s.sendall(_upgrade_request(cast.host_offline_token))
        wait_until(lambda: _waiters(gate._new) == 1, what="the connection to wait for a turn")
        s.close()  # its agent gives up (connect timeout) while it waits
    finally:
        gate.release()
    wait_until(lambda: gate.busy == 0, what="the abandoned connection to hand its turn back")
    ws = RawWebSocket(gated.servers.agent_port, cast.host_offline_token)
    assert ws.status == 101 and _welcomed(ws)
    ws.close()


def test_beyond_max_pending_connections_wait_in_the_backlog_while_the_pending_ones_move(app):
    """A full pending set that keeps moving (agents authenticating in a storm) holds newcomers in the
    kernel's listen backlog instead of answering them 503; one that stands still (silent sockets)
    is shed with 503 after ``full_hold``. The clock is the server's own, moved by hand."""
    from app.agents.server import AgentServer

    now = [1000.0]
    server = AgentServer("127.0.0.1", 0, app, backlog=16, max_pending=1, handshake_timeout=10.0, clock=lambda: now[0])
    peers = []
    try:
        first = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        peers.append(first)
        server._handle_request_noblock()  # accepted: it is pending (its thread waits for a request)
        assert server.pending == 1
        second = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        peers.append(second)
        server._handle_request_noblock()  # full, and it moved just now: the second stays in the backlog
        assert server.pending == 1 and server._refused_count == 0

        now[0] += server.full_hold + 0.1  # nothing moved for full_hold: the next one is refused
        server._handle_request_noblock()
        assert server._refused_count == 1
        second.settimeout(5)
        assert second.recv(65536).startswith(b"HTTP/1.1 503 ")

        third = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        peers.append(third)
        with server._lock:  # the pending one authenticates: the set is moving again
            (pending,) = server._pending
        server.authenticated(pending)
        first.close()
        server._handle_request_noblock()  # room: accepted, not refused
        assert server._refused_count == 1 and server.pending == 1
    finally:
        for s in peers:
            s.close()
        server.server_close()


# -- the welcome rate, and the window a stop names for its agents' return


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def still_cpu() -> float:
    """A CPU clock that never moves: no estimate from the CPU a welcome costs."""
    return 0.0


def test_the_welcome_rate_is_the_mean_pace_while_others_wait():
    clock = FakeClock()
    rate = WelcomeRate(window=3.0, clock=clock, cpu_clock=still_cpu)
    for _ in range(201):  # 100 welcomes a second for 2 s: less saturated time than the window
        clock.now += 0.01
        rate.record(saturated=True)
    assert rate.rate is None
    for _ in range(200):  # on for 2 s more: enough to say
        clock.now += 0.01
        rate.record(saturated=True)
    assert rate.rate == pytest.approx(100, rel=0.01)
    for _ in range(400):  # 8 s at 50 a second, still saturated: the mean over all 12 s, not the best
        clock.now += 0.02
        rate.record(saturated=True)
    assert rate.rate == pytest.approx(800 / 12, rel=0.01)


def test_time_with_nobody_waiting_is_not_counted():
    clock = FakeClock()
    rate = WelcomeRate(window=3.0, clock=clock, cpu_clock=still_cpu)
    for i in range(1000):  # every other welcome with nobody waiting: arrivals, not the pace
        clock.now += 0.01
        rate.record(saturated=i % 2 == 0)
    assert rate.rate is None
    rate.record(saturated=True)
    clock.now += 60  # a minute with no welcome, then saturated again: the minute is not pace
    rate.record(saturated=True)
    assert rate.rate is None
    for _ in range(400):
        clock.now += 0.01
        rate.record(saturated=True)
    assert rate.rate == pytest.approx(100, rel=0.01)


def test_a_process_never_saturated_takes_its_pace_from_what_a_welcome_costs_it():
    clock, cpu = FakeClock(), [0.0]
    rate = WelcomeRate(window=3.0, clock=clock, cpu_clock=lambda: cpu[0], cpu_share=0.5)

    def welcomes(n: int, every: float, cpu_each: float) -> None:
        for _ in range(n):
            clock.now += every
            cpu[0] += cpu_each
            rate.record(saturated=False)

    welcomes(99, 0.05, 0.002)  # 20 a second, 2 ms of CPU each, nobody waiting
    assert rate.rate is None  # fewer than CPU_MIN_SAMPLE welcomes in busy seconds so far
    welcomes(300, 0.05, 0.002)
    assert rate.rate == pytest.approx(0.5 / 0.002, rel=0.01)  # half a core at 2 ms a welcome
    welcomes(20, 5.0, 0.5)  # lone welcomes: their seconds are mostly other work, not counted
    assert rate.rate == pytest.approx(250, rel=0.01)
    for _ in range(400):  # saturated time, once there is enough of it, is the measure
        clock.now += 0.01
        rate.record(saturated=True)
    assert rate.rate == pytest.approx(100, rel=0.01)


@pytest.mark.parametrize(
    "held, rate, expected",
    [
        (2500, 125.0, 2500 / 125 - QUEUE_BUDGET_S),  # a worker of a 10,000-agent fleet on 4 workers
        (2000, 450.0, None),  # welcomed within the agents' own 4 s rule plus the budget: say nothing
        (2000, None, None),  # never saturated: no measured rate, say nothing
        (0, 100.0, None),
    ],
)
def test_a_stop_names_a_window_only_when_its_agents_would_outwait_their_timeout(held, rate, expected):
    assert restart_spread(held, rate) == expected


def test_the_gate_counts_its_waiters():
    gate = WorkGate(1)
    assert gate.acquire(0) and gate.waiting == 0
    t, out = _waiting(gate)
    assert gate.waiting == 1
    gate.release()
    t.join(5)
    assert out == [True] and gate.waiting == 0
    gate.release()


def test_a_welcome_counts_towards_the_rate_only_while_others_wait_for_a_turn(gated, cast):
    server = gated.servers.agent
    clock = FakeClock()
    server.welcome_rate = WelcomeRate(window=1.0, clock=clock)
    ws = RawWebSocket(gated.servers.agent_port, cast.host_offline_token)
    assert ws.status == 101 and _welcomed(ws)  # a real welcome, nobody waiting: not counted
    wait_until(lambda: server.gate.busy == 0, what="the welcomed agent to hand its turn back")
    assert server.gate.acquire(0)
    waiter, out = _waiting(server.gate)
    try:
        for _ in range(20):  # as the link does after each welcome, with one connection waiting
            clock.now += 0.1
            server.welcomed()
    finally:
        server.gate.release()
        waiter.join(5)
        server.gate.release()
    assert server.welcome_rate.rate == pytest.approx(10, rel=0.01)
    ws.close()
