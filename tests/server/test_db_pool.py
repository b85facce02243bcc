"""The PostgreSQL connection pool checks a connection before use without a round trip to the server."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from app.extensions import db
from tests.support.wait import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(30)]


def test_a_pooled_connection_the_database_ended_is_replaced_before_use(app):
    db.engine.dispose()  # one connection in the pool: the one this test ends
    pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
    db.session.commit()  # back to the pool
    dsn = sa.engine.make_url(app.config["SQLALCHEMY_DATABASE_URI"]).set(drivername="postgresql")
    with psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        wait_until(
            lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
            10,
            what="the backend gone",
        )
    # no error: the pool saw the server's goodbye on the idle socket and connected again
    assert db.session.scalar(sa.text("SELECT pg_backend_pid()")) not in (None, pid)


def test_an_idle_pooled_connection_is_reused_as_is(app):
    db.engine.dispose()
    pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
    db.session.commit()
    assert db.session.scalar(sa.text("SELECT pg_backend_pid()")) == pid


def test_a_connection_past_the_select_limit_is_reused_as_is(app):
    """A server holding thousands of agent sockets gets database descriptors past FD_SETSIZE (1024)."""
    import os

    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        db.engine.dispose()
        pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
        assert db.session.connection().connection.dbapi_connection.fileno() > 1024
        db.session.commit()
        assert db.session.scalar(sa.text("SELECT pg_backend_pid()")) == pid
        db.session.commit()
    finally:
        for fd in spare:
            os.close(fd)
