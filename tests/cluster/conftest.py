import os

import pytest

from app import create_app
from app.extensions import db
from app.models import ApiToken
from app.updates import releases
from tests.conftest import SERVER_VERSION
from tests.support.live import LiveServer

#: Fast heartbeats for tests: an instance is dead after 1 s of silence.
FAST = {"INSTANCE_HEARTBEAT_S": 0.2, "INSTANCE_EXPIRY_S": 1.0, "HEARTBEAT_S": 5, "HEARTBEAT_TIMEOUT": 30}


@pytest.fixture
def release(app, tmp_path):
    path = tmp_path / "artifact.pyz"
    path.write_bytes(os.urandom(4096))
    return releases.register(str(path), SERVER_VERSION)


@pytest.fixture
def pair(app, app_config, cast, release):
    """Two instances (two apps, each served in this process) on the test's PostgreSQL database.

    ``a`` is the test's own app; ``b`` a second app on the same database. Both run the scheduler.
    """
    app.config.update(FAST, BUILD_AGENT_ON_START=False)
    other = create_app({**app_config, **FAST, "BUILD_AGENT_ON_START": False}, environ={})
    a = LiveServer(app, scheduler=True)
    b = LiveServer(other, scheduler=True)
    with a, b:
        yield a, b
    with other.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def api_headers(app, cast):
    _, token = ApiToken.issue(cast.admin, "cluster tests")
    db.session.commit()
    return {"Authorization": f"Bearer {token}"}
