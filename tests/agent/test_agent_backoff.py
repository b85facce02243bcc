"""Reconnect backoff: full jitter, capped, reset by a welcome or a long-lived connection; quick (still
jittered) retries of refused connects while a server that closed with 1001 restarts."""

import random

import pytest
from simple_websocket import ConnectionClosed

from agent import protocol
from agent.client import Agent
from agent.transport import RESTART_RETRY_S, RESTART_WINDOW_S, Backoff


def test_full_jitter_stays_within_the_exponential_ceiling():
    rng = random.Random(1234)
    backoff = Backoff(base=0.5, cap=30, rand=rng.random)
    for attempt in range(40):
        ceiling = min(30, 0.5 * 2**attempt)
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling


def test_the_ceiling_doubles_then_caps():
    backoff = Backoff(base=0.5, cap=5, rand=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1, 2, 4, 5, 5]


def test_zero_jitter_is_allowed_so_a_storm_spreads_from_zero():
    backoff = Backoff(rand=lambda: 0.0)
    assert backoff.next_delay() == 0.0


def test_reset_starts_the_ladder_again():
    backoff = Backoff(base=0.5, cap=30, rand=lambda: 1.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_a_huge_attempt_count_does_not_overflow():
    backoff = Backoff(base=0.5, cap=30, rand=lambda: 1.0)
    backoff.attempt = 10_000
    assert backoff.next_delay() == 30


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def agent_with(make_config, connect, clock, stop_after, cap=4):
    sleeps = []
    holder = {}

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) >= stop_after:
            holder["agent"].request_stop()

    agent = Agent(
        make_config(backoff_max_s=cap), connect=connect, sleep=sleep, clock=clock, rand=lambda: 1.0, program=None
    )
    holder["agent"] = agent
    return agent, sleeps


def test_failed_connects_back_off_up_to_the_configured_cap(make_config):
    def refuse(url, token):
        raise ConnectionRefusedError(111, "Connection refused")

    agent, sleeps = agent_with(make_config, refuse, Clock(), stop_after=6)
    assert agent.run() == 0
    assert sleeps == [0.5, 1, 2, 4, 4, 4]


class DroppingSocket:
    """A link that is lost on the first receive."""

    connected = False
    close_reason = None
    close_message = None

    def send(self, frame):
        pass

    def receive(self, timeout=None):
        raise ConnectionClosed()


@pytest.mark.parametrize("lived, expected", [(11.0, [0.5, 0.5, 0.5]), (1.0, [0.5, 1, 2])])
def test_a_connection_that_lived_ten_seconds_resets_the_backoff(make_config, lived, expected):
    clock = Clock()

    def connect(url, token):
        clock.now += lived  # the connection lives this long before it drops
        return DroppingSocket()

    agent, sleeps = agent_with(make_config, connect, clock, stop_after=3)
    agent.run()
    assert sleeps == expected


# -- a server restart: after a 1001 close, refused connects are retried quickly (full jitter)


def test_after_the_server_went_away_refused_connects_stay_within_the_restart_retry():
    clock = Clock()
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=clock)
    backoff.server_going_away()
    assert [backoff.next_delay(refused=True) for _ in range(5)] == [RESTART_RETRY_S] * 5
    assert backoff.attempt == 0  # the ladder did not move


def test_the_restart_retry_keeps_its_jitter():
    rng = random.Random(7)
    backoff = Backoff(base=0.5, cap=10, rand=rng.random, clock=Clock())
    backoff.server_going_away()
    delays = [backoff.next_delay(refused=True) for _ in range(200)]
    assert all(0 <= d <= RESTART_RETRY_S for d in delays)
    assert len({round(d, 3) for d in delays}) > 150  # spread, not one instant for the whole fleet


def test_a_busy_server_still_climbs_the_ladder_during_a_restart():
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=Clock())
    backoff.server_going_away()
    # a 503, a timeout or a reset: the server is up but busy
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1, 2, 4, 8]


def test_the_restart_window_ends_and_refusals_climb_again():
    clock = Clock()
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=clock)
    backoff.server_going_away()
    assert backoff.next_delay(refused=True) == RESTART_RETRY_S
    clock.now += RESTART_WINDOW_S
    assert [backoff.next_delay(refused=True) for _ in range(3)] == [0.5, 1, 2]


def test_the_restart_retry_never_exceeds_the_cap():
    backoff = Backoff(base=0.5, cap=1, rand=lambda: 1.0, clock=Clock())
    backoff.server_going_away()
    assert backoff.next_delay(refused=True) == 1


def test_a_reset_ends_the_restart_window():
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=Clock())
    backoff.server_going_away()
    backoff.reset()
    assert not backoff.restarting
    assert [backoff.next_delay(refused=True) for _ in range(3)] == [0.5, 1, 2]


class ClosingSocket(DroppingSocket):
    """A link the server closes with ``code`` on the first receive."""

    def __init__(self, code):
        self.close_reason = code


@pytest.mark.parametrize(
    "code, failure, expected",
    [
        # the server restarts: refusals are retried within RESTART_RETRY_S (4 s), without climbing
        (protocol.CLOSE_GOING_AWAY, ConnectionRefusedError(111, "Connection refused"), [0.5, 4, 4, 4, 4, 4]),
        # any other close: the ladder (cap 30 here)
        (protocol.CLOSE_NORMAL, ConnectionRefusedError(111, "Connection refused"), [0.5, 1, 2, 4, 8, 16]),
        # going away, but the port answers and fails otherwise (a balancer, a busy server): the ladder
        (protocol.CLOSE_GOING_AWAY, TimeoutError("timed out"), [0.5, 1, 2, 4, 8, 16]),
    ],
)
def test_an_agent_whose_server_went_away_retries_refused_connects_quickly(make_config, code, failure, expected):
    calls = []

    def connect(url, token):
        calls.append(url)
        if len(calls) == 1:
            return ClosingSocket(code)
        raise failure

    agent, sleeps = agent_with(make_config, connect, Clock(), stop_after=6, cap=30)
    agent.run()
    assert sleeps == expected


# -- a server that names a window in its 1001 close: the fleet spreads its return over it


def test_a_named_window_spreads_the_first_attempt_over_it():
    rng = random.Random(3)
    firsts = []
    for _ in range(400):
        backoff = Backoff(base=0.5, cap=10, rand=rng.random, clock=Clock())
        backoff.server_going_away(spread=20.0)
        firsts.append(backoff.next_delay())
    assert all(0 <= d <= 20.0 for d in firsts)
    # uniform over the window, not the 0-0.5 s of the ladder's first step
    assert sum(d < 5 for d in firsts) < 150 and sum(d > 15 for d in firsts) > 50


def test_a_refusal_within_the_named_window_is_retried_within_what_is_left_of_it():
    clock = Clock()
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=clock)
    backoff.server_going_away(spread=20.0)
    assert backoff.next_delay() == 20.0  # the first attempt: anywhere in the window (here its end)
    clock.now += 3.0  # refused: the server is not back yet
    assert backoff.next_delay(refused=True) == 17.0
    clock.now += 15.0  # 2 s left: the agent's own 4 s rule is longer
    assert backoff.next_delay(refused=True) == RESTART_RETRY_S
    assert backoff.attempt == 0  # refusals did not climb the ladder


def test_a_named_window_outlasts_the_restart_window_when_it_is_longer():
    clock = Clock()
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=clock)
    backoff.server_going_away(spread=protocol.MAX_RECONNECT_SPREAD_S)
    backoff.next_delay()
    clock.now += RESTART_WINDOW_S  # past the plain restart window, still in the named one
    assert backoff.restarting
    assert backoff.next_delay(refused=True) == RESTART_RETRY_S
    clock.now += RESTART_RETRY_S
    assert not backoff.restarting


def test_a_busy_server_climbs_the_ladder_within_a_named_window_too():
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=Clock())
    backoff.server_going_away(spread=20.0)
    assert backoff.next_delay() == 20.0
    # a 503, a timeout or a reset: the server is up but busy
    assert [backoff.next_delay() for _ in range(3)] == [0.5, 1, 2]


def test_a_reset_forgets_the_named_window():
    backoff = Backoff(base=0.5, cap=10, rand=lambda: 1.0, clock=Clock())
    backoff.server_going_away(spread=20.0)
    backoff.reset()
    assert backoff.next_delay() == 0.5


@pytest.mark.parametrize(
    "message, expected",
    [
        # the server named 20 s: the first attempt at the window's end (rand 1.0), then what is left
        # of it (the clock does not move here), never climbing
        ("server shutting down; reconnect within 20.0 s", [20.0, 20.0, 20.0, 20.0]),
        # no window named (an older server, or a fleet it welcomes in time): the plain 1001 rule
        ("server shutting down", [0.5, 4, 4, 4]),
        # a window past the bound is held to it
        ("server shutting down; reconnect within 999.0 s", [60.0, 60.0, 60.0, 60.0]),
    ],
)
def test_an_agent_spreads_its_return_over_the_window_its_server_named(make_config, message, expected):
    calls = []

    def connect(url, token):
        calls.append(url)
        if len(calls) == 1:
            sock = ClosingSocket(protocol.CLOSE_GOING_AWAY)
            sock.close_message = message
            return sock
        raise ConnectionRefusedError(111, "Connection refused")

    agent, sleeps = agent_with(make_config, connect, Clock(), stop_after=4, cap=30)
    agent.run()
    assert sleeps == expected
