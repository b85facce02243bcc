"""Fixtures: a migrated database per test, the app, clients, and a small cast of personas."""

from __future__ import annotations

import os
import zlib
from collections import Counter

import pytest
from hypothesis import settings

from app import create_app
from app.extensions import db
from app.models import Host, User
from app.runtime import runtime
from app.timeutil import FakeClock
from tests.support import dbsetup, routecache
from tests.support.pki import Pki, make_pki

# The same examples on every run: a property test must not pass or fail by the draw of the day.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")

# Each test's create_app reuses the URL builders compiled by the first (tests/support/routecache.py).
routecache.install()

SERVER_VERSION = "2.0.0"
OLD_VERSION = "1.0.0"
TEST_PASSWORD_HASH_METHOD = "pbkdf2:sha256:1"


@pytest.fixture(scope="session")
def db_template(tmp_path_factory):
    """Migrate once per run; each test gets a copy (SQLite) or a truncated schema (PostgreSQL)."""
    base = tmp_path_factory.mktemp("dbtemplate")
    if dbsetup.using_postgres():
        dbsetup.reset_postgres_schema()
        url = dbsetup.pg_url_with_schema()
        dbsetup.migrate(url, str(base / "instance"))
        return url
    path = str(base / "template.sqlite3")
    dbsetup.migrate("sqlite:///" + path, str(base / "instance"))
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """This run's own CA and TLS certificates (tests/support/pki.py), made once per run."""
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def database_url(db_template, tmp_path):
    return dbsetup.fresh_database(db_template, str(tmp_path))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def app_config(tmp_path, database_url):
    return {
        "TESTING": True,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SECRET_KEY": "test-secret",
        "VERSION": SERVER_VERSION,
        "WTF_CSRF_ENABLED": False,
        "LOGIN_MAX_FAILURES": 3,
        "LOGIN_LOCKOUT_S": 60.0,
        # One pbkdf2 round instead of scrypt: every persona and login would otherwise pay ~0.1 s.
        # tests/server/test_config.py proves the production default is still scrypt.
        "PASSWORD_HASH_METHOD": TEST_PASSWORD_HASH_METHOD,
    }


@pytest.fixture
def app(app_config, clock):
    app = create_app(app_config, environ={})
    runtime(app).clock = clock
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


class Cast:
    """The personas most tests need, created in the test's database."""

    def __init__(self):
        self.admin = self._user("admin", "admin-pass-123", "admin")
        self.viewer = self._user("viewer", "viewer-pass-123", "viewer")
        self.host_online, self.host_online_token = self._host("web-1", SERVER_VERSION, True)
        self.host_offline, self.host_offline_token = self._host("db-1", SERVER_VERSION, False)
        self.host_behind, self.host_behind_token = self._host("app-1", OLD_VERSION, True)
        db.session.commit()

    @staticmethod
    def _user(name, password, role):
        return User.create(name, password, role)

    @staticmethod
    def _host(name, version, online):
        host, token = Host.enrol(name)
        host.agent_version = version
        host.os, host.arch, host.capabilities = "linux", "x86_64", ["update"]
        host.connected = online
        from app.timeutil import utcnow

        host.last_seen = utcnow()
        return host, token


@pytest.fixture
def cast(app):
    return Cast()


class AuthActions:
    def __init__(self, client):
        self._client = client

    def login(self, username="admin", password="admin-pass-123"):
        return self._client.post("/login", data={"username": username, "password": password})

    def logout(self):
        return self._client.post("/logout")


@pytest.fixture
def auth(client):
    return AuthActions(client)


@pytest.fixture
def live_fleet(app, tmp_path, tmp_path_factory, database_url):
    """A :class:`~tests.support.live.LiveFleet` on the test's database (server process + real agents),
    everything stopped at teardown. Seed it, start the server, then the agents."""
    from tests.support.live import LiveFleet

    fleet = LiveFleet(str(tmp_path), database_url, str(tmp_path_factory.getbasetemp() / "agent-builds"))
    try:
        yield fleet
    finally:
        fleet.stop()


class _GroupNodeIds:
    """Make pytest-xdist's ``--dist loadgroup`` groups take effect under pytest 9.2.

    xdist 3.8's worker names a grouped item ``<nodeid>@<group>`` by setting ``item._nodeid``, and
    its scheduler reads the group from that suffix; pytest 9.2 keeps the nodeid in ``item._id``
    and ignores ``_nodeid``, so every test was scheduled on its own: a module's tests were spread
    over the workers, each building the module-scoped server, browser or wheel again, and a test
    that relied on an earlier test of its module having run on the same worker could fail (the
    request-limit login flake on PostgreSQL). This applies the name xdist meant to give; it does
    nothing once the two agree again.
    """

    @pytest.hookimpl(trylast=True)  # after xdist's worker has named the groups
    def pytest_collection_modifyitems(self, items):
        from _pytest.nodeid import NodeId

        for item in items:
            meant = item.__dict__.get("_nodeid")
            if isinstance(meant, str) and meant != item.nodeid:
                item._id = NodeId.parse(meant)


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        config.pluginmanager.register(_GroupNodeIds(), "rm-xdist-group-nodeids")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("RM_TEST_DATABASE_URL"):
        skip = pytest.mark.skip(reason="RM_TEST_DATABASE_URL not set")
        for item in items:
            if "postgres" in item.keywords:
                item.add_marker(skip)
    # schemathesis 4.32 under pytest 9.2: every API operation's item got the same nodeid (pytest 9
    # builds it from ``originalname``, which schemathesis sets to the bare function name), and
    # pytest-xdist keys its work by nodeid, so under scripts/test one of the 41 operations ran and
    # the others were silently dropped. Each item's nodeid carries its operation again.
    counts = Counter(item.nodeid for item in items)
    for item in items:
        if counts[item.nodeid] > 1 and type(item).__name__ == "SchemathesisFunction":
            item._id = item.parent.id.child(item.name).with_params(None)
    # Under pytest-xdist's ``--dist loadgroup`` (scripts/test) each test goes to whichever worker is
    # free, except that a module's tests sharing a module-scoped fixture (a live server, Chromium, a
    # built wheel) form one group on one worker, so that fixture is made once per run. A module whose
    # tests are independent of each other and long in sum (XDIST_GROUPS = k) is cut into k groups by
    # test name, each making the fixture once, so one module is not the whole run's critical path.
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            group = item.module.__name__
            parts = getattr(item.module, "XDIST_GROUPS", 1)
            if parts > 1:
                group += f"#{zlib.crc32(item.name.encode()) % parts}"
            item.add_marker(pytest.mark.xdist_group(group))
