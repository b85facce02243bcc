"""One live two-plane server per module for the property tests (hypothesis runs many examples
against it; starting a server per example would dominate the run time)."""

from __future__ import annotations

import pytest

from app.runtime import runtime
from app.timeutil import FakeClock
from tests.support import dbsetup
from tests.support.live import LiveServer


@pytest.fixture(scope="module")
def module_app(db_template, tmp_path_factory, request):
    """A real app on its own migrated database, with a registered release and a fake clock.

    A test module tunes it with a ``LIVE_CONFIG`` dict of config overrides.
    """
    overrides = {"HEARTBEAT_S": 30, "HEARTBEAT_TIMEOUT": 300, **getattr(request.module, "LIVE_CONFIG", {})}
    for app in dbsetup.module_app(db_template, tmp_path_factory.mktemp("props"), **overrides):
        runtime(app).clock = FakeClock()
        yield app


@pytest.fixture(scope="module")
def module_live(module_app):
    """The real server (no scheduler: the tests drive sweeps and ticks themselves)."""
    with LiveServer(module_app) as server:
        yield server
