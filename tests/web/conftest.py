"""Helpers for the web tests: logged-in clients, API tokens, fake live sockets, a release."""

from __future__ import annotations

import pytest
from flask import g
from flask.testing import FlaskClient

from app.agents.registry import Connection
from app.extensions import db
from app.models import ApiToken
from app.runtime import runtime
from tests.conftest import SERVER_VERSION
from tests.web.helpers import FakeSocket


class FreshRequestClient(FlaskClient):
    """A test client whose requests don't inherit the previous request's user.

    The ``app`` fixture keeps one app context open for the whole test (so tests share the
    request's database session), and Flask reuses it for every request; ``g`` would then carry
    Flask-Login's cached user from one request into the next, which a real server never does.
    """

    def open(self, *args, **kwargs):
        for key in ("_login_user", "api_token_prefix"):
            g.pop(key, None)
        return super().open(*args, **kwargs)


@pytest.fixture
def client(app):
    app.test_client_class = FreshRequestClient
    return app.test_client()


@pytest.fixture
def connect(app):
    """Register a fake live connection for a host, as the agent link does after a hello."""
    registry = runtime(app).connections

    def _connect(host, answer_pings: bool = True) -> FakeSocket:
        ws = FakeSocket(answer_pings)
        ws.conn = Connection(host.id, ws)
        registry.register(ws.conn)
        return ws

    return _connect


@pytest.fixture
def online(cast, connect):
    """The cast's online hosts, with live (fake) sockets: ``{"web-1": FakeSocket, "app-1": ...}``."""
    return {"web-1": connect(cast.host_online), "app-1": connect(cast.host_behind)}


@pytest.fixture
def release(app, tmp_path):
    """Register an agent artifact for the server's version, so dispatch has something to send."""
    from app.updates import releases

    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(b"PK-fake-agent" * 64)
    return releases.register(str(path), SERVER_VERSION)


@pytest.fixture
def as_admin(client, auth, cast):
    auth.login("admin", "admin-pass-123")
    return client


@pytest.fixture
def as_viewer(client, auth, cast):
    auth.login("viewer", "viewer-pass-123")
    return client


@pytest.fixture
def admin_token(cast):
    tok, plain = ApiToken.issue(cast.admin, "tests")
    db.session.commit()
    return plain


@pytest.fixture
def viewer_token(cast):
    tok, plain = ApiToken.issue(cast.viewer, "tests")
    db.session.commit()
    return plain
