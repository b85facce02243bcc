import os

import pytest

from app.extensions import db
from app.runtime import runtime
from app.updates import releases
from tests.conftest import SERVER_VERSION
from tests.support.live import LiveServer
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until


@pytest.fixture
def release(app, tmp_path):
    """A registered artifact for the server's version (its bytes matter only to real agents)."""
    path = tmp_path / "artifact.pyz"
    path.write_bytes(os.urandom(4096))
    rel = releases.register(str(path), SERVER_VERSION)
    return rel


@pytest.fixture
def live(app, cast, release):
    app.config["HEARTBEAT_S"] = 5
    app.config["HEARTBEAT_TIMEOUT"] = 30
    app.config["BUILD_AGENT_ON_START"] = False
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def agent_for(live, app):
    """Connect a scripted agent for a cast host; it shows online before the test goes on."""
    made = []

    def make(host, token, version, capabilities=("update",)):
        a = ScriptedAgent(live.agent_ws_url, token, version, capabilities)
        a.connect()
        # Registered before its welcome, reconciled after it: a dispatch before the reconcile made
        # the hello re-send the new job's command on PostgreSQL (a harmless duplicate, but not the
        # frame a test expects next).
        wait_until(
            lambda: (c := runtime(app).connections.get(host.id)) is not None and c.settled.is_set(),
            what="agent registered and its hello reconciled",
        )
        db.session.rollback()
        made.append(a)
        return a

    yield make
    for a in made:
        a.disconnect()
