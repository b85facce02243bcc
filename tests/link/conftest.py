import pytest

from tests.support.live import LiveServer


@pytest.fixture
def live(app, cast):
    app.config["HEARTBEAT_S"] = 0.2
    app.config["HEARTBEAT_TIMEOUT"] = 1.0
    app.config["BUILD_AGENT_ON_START"] = False
    with LiveServer(app) as server:
        yield server
