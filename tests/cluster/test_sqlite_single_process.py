"""SQLite is one process: ``--workers`` and a second ``serve`` on the same database are refused at start."""

from __future__ import annotations

import pytest

from app.serve import sqlite_single_process
from tests.support import dbsetup

pytestmark = pytest.mark.skipif(dbsetup.using_postgres(), reason="SQLite's single-process mode")


def test_serve_with_workers_on_sqlite_is_refused_with_the_reason(runner):
    result = runner.invoke(args=["serve", "--workers", "2", "--no-build"])
    assert result.exit_code != 0
    assert "--workers 2 needs PostgreSQL" in str(result.exception) or "--workers 2 needs PostgreSQL" in result.output
    assert "SQLite serves one process" in str(result.exception) + result.output


def test_a_second_serve_on_the_same_sqlite_database_is_refused(app):
    first = sqlite_single_process(app)
    try:
        with pytest.raises(SystemExit) as refused:
            sqlite_single_process(app)
        message = str(refused.value)
        assert "another restic-manager serve already runs on the SQLite database" in message
        assert app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///") in message
        assert "PostgreSQL" in message
    finally:
        first.close()
    again = sqlite_single_process(app)  # the first one's lock went with it
    again.close()
