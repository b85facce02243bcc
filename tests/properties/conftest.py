"""One live two-plane server per module for the property tests (hypothesis runs many examples
against it; starting a server per example would dominate the run time)."""

from __future__ import annotations

import os

import pytest

from app import create_app
from app.extensions import db
from app.timeutil import FakeClock
from tests.conftest import SERVER_VERSION
from tests.support import dbsetup
from tests.support.live import LiveServer


@pytest.fixture(scope="module")
def module_app(db_template, tmp_path_factory, request):
    """A real app on its own migrated database, with a registered release and a fake clock.

    A test module tunes it with a ``LIVE_CONFIG`` dict of config overrides.
    """
    tmp = tmp_path_factory.mktemp("props")
    config = {
        "TESTING": True,
        "INSTANCE_PATH": str(tmp / "instance"),
        "SQLALCHEMY_DATABASE_URI": dbsetup.fresh_database(db_template, str(tmp)),
        "SECRET_KEY": "props-secret",
        "VERSION": SERVER_VERSION,
        "BUILD_AGENT_ON_START": False,
        "HEARTBEAT_S": 30,
        "HEARTBEAT_TIMEOUT": 300,
        **getattr(request.module, "LIVE_CONFIG", {}),
    }
    app = create_app(config, environ={})
    app.extensions["rm.clock"] = FakeClock()
    with app.app_context():
        from app.updates import releases

        artifact = tmp / "artifact.pyz"
        artifact.write_bytes(os.urandom(2048))
        releases.register(str(artifact), SERVER_VERSION)
        yield app
        db.session.remove()
        db.engine.dispose()


@pytest.fixture(scope="module")
def module_live(module_app):
    """The real server (no scheduler: the tests drive sweeps and ticks themselves)."""
    with LiveServer(module_app) as server:
        yield server
