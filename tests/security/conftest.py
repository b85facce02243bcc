"""A module-scoped live server for the RBAC matrix: one database and one server for every route."""

from __future__ import annotations

import os

import pytest

from app import create_app
from app.extensions import db
from tests.conftest import SERVER_VERSION
from tests.support import dbsetup


@pytest.fixture(scope="module")
def module_app(db_template, tmp_path_factory):
    """A real app with CSRF on (as in production), its own migrated database, and a release."""
    tmp = tmp_path_factory.mktemp("rbac")
    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_PATH": str(tmp / "instance"),
            "SQLALCHEMY_DATABASE_URI": dbsetup.fresh_database(db_template, str(tmp)),
            "SECRET_KEY": "rbac-secret",
            "VERSION": SERVER_VERSION,
            "WTF_CSRF_ENABLED": True,
            "BUILD_AGENT_ON_START": False,
            "HEARTBEAT_S": 5,
            "HEARTBEAT_TIMEOUT": 60,
            "PING_TIMEOUT": 5.0,
        },
        environ={},
    )
    with app.app_context():
        from app.updates import releases

        artifact = tmp / "artifact.pyz"
        artifact.write_bytes(os.urandom(2048))
        releases.register(str(artifact), SERVER_VERSION)
        yield app
        db.session.remove()
        db.engine.dispose()
