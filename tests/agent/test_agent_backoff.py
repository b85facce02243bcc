"""Reconnect backoff: full jitter, capped, reset by a welcome or a long-lived connection."""

import random

import pytest
from simple_websocket import ConnectionClosed

from agent.client import Agent
from agent.transport import Backoff


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


def agent_with(make_config, connect, clock, stop_after):
    sleeps = []
    holder = {}

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) >= stop_after:
            holder["agent"].request_stop()

    agent = Agent(
        make_config(backoff_max_s=4), connect=connect, sleep=sleep, clock=clock, rand=lambda: 1.0, program=None
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
