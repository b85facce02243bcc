"""The refusal of an agent that cannot update itself names the real cause.

The agent says why in its hello (``update_unavailable``: no pinned release key, or not a
replaceable program file); an old agent says nothing. The 422 ``agent_cannot_update`` tells the
three apart, and so does the rollout plan.
"""

from __future__ import annotations

import pytest

from app.errors import Refusal
from app.extensions import db
from app.runtime import runtime
from app.updates import dispatch, fleet
from tests.conftest import OLD_VERSION
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def say(live, app, cast):
    """Connect app-1's agent without the update capability, with ``update_unavailable`` or none."""
    agents = []

    def connect(reason=...):
        agent = ScriptedAgent(live.agent_ws_url, cast.host_behind_token, OLD_VERSION, capabilities=())
        if reason is not ...:
            agent.hello_extra["update_unavailable"] = reason
        agent.connect()
        agents.append(agent)
        wait_until(lambda: runtime(app).connections.is_connected(cast.host_behind.id), what="agent registered")
        db.session.rollback()
        return agent

    yield connect
    for a in agents:
        a.disconnect()


def refusal(host_id) -> Refusal:
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(host_id, "admin")
    assert (e.value.status, e.value.code) == (422, "agent_cannot_update")
    return e.value


@pytest.mark.parametrize(
    "reason,words",
    [
        ("no_release_key", ["no release key pinned", "RM_RELEASE_PUBLIC_KEY", "--release-key"]),
        ("not_replaceable", ["does not run from a program file", "install one-liner"]),
        (..., ["old agent", "does not say why"]),
        ("needs_a_newer_kernel", ["cannot update itself: needs_a_newer_kernel"]),  # a newer agent's reason
    ],
)
def test_the_refusal_names_the_cause_the_agent_gave(say, cast, reason, words):
    say(reason)
    message = refusal(cast.host_behind.id).message
    assert "app-1" in message
    for w in words:
        assert w in message, message


def test_the_plan_leaves_such_an_agent_out_with_the_same_words(say, cast):
    say("no_release_key")
    plan = fleet.plan()
    left = {lo.host.name: lo for lo in plan.left_out}
    assert left["app-1"].reason == "cannot_update" and "no release key pinned" in left["app-1"].detail


def test_a_hello_with_an_oversized_reason_is_invalid():
    import json

    from agent import protocol

    data = {
        "agent_version": "1.0.0",
        "os": "linux",
        "arch": "x86_64",
        "hostname": "h",
        "python": "3.11",
        "capabilities": [],
        "boot_id": "b",
        "last_update": None,
    }
    protocol.decode(json.dumps({"type": "hello", "id": "1", "data": data}))  # without the field: an old agent
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.decode(json.dumps({"type": "hello", "id": "1", "data": {**data, "update_unavailable": "x" * 65}}))
    assert e.value.field == "data.update_unavailable"
