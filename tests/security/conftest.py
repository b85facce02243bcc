"""A module-scoped live server for the RBAC matrix: one database and one server for every route."""

from __future__ import annotations

import pytest

from tests.support import dbsetup


@pytest.fixture(scope="module")
def module_app(db_template, tmp_path_factory):
    """A real app with CSRF on (as in production), its own migrated database, and a release."""
    # The scripted agents answer pings but send no heartbeats: a heartbeat timeout far beyond the
    # module's run keeps them online however long a loaded machine takes over the matrix.
    overrides = {"WTF_CSRF_ENABLED": True, "HEARTBEAT_S": 5, "HEARTBEAT_TIMEOUT": 3600, "PING_TIMEOUT": 5.0}
    yield from dbsetup.module_app(db_template, tmp_path_factory.mktemp("rbac"), **overrides)
