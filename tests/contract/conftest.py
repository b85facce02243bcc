"""One live server for the contract tests: real waitress and werkzeug, its own database."""

from __future__ import annotations

import pytest

from tests.support import dbsetup
from tests.support.live import LiveServer


@pytest.fixture(scope="module")
def module_app(db_template, tmp_path_factory):
    """A real app with CSRF on, as in production, on its own migrated database with a release."""
    overrides = {"WTF_CSRF_ENABLED": True, "HEARTBEAT_S": 30, "HEARTBEAT_TIMEOUT": 300, "PING_TIMEOUT": 0.5}
    yield from dbsetup.module_app(db_template, tmp_path_factory.mktemp("contract"), **overrides)


@pytest.fixture(scope="module")
def module_live(module_app):
    with LiveServer(module_app) as server:
        yield server
