"""Test databases: a migrated SQLite template copied per test, or a fresh PostgreSQL schema per run."""

from __future__ import annotations

import os
import shutil
from urllib.parse import quote

import sqlalchemy as sa

PG_URL = os.environ.get("RM_TEST_DATABASE_URL", "").strip()
# A schema of its own per checkout lets two runs share one server (RM_TEST_PG_SCHEMA); under
# pytest-xdist each worker process owns ``<schema>_<worker>`` (``rm_test_gw0``, ...), so the
# workers of one run never truncate each other's tables.
PG_SCHEMA = (os.environ.get("RM_TEST_PG_SCHEMA", "").strip() or "rm_test") + (
    f"_{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else ""
)


def using_postgres() -> bool:
    return bool(PG_URL)


def pg_url_with_schema(schema: str = PG_SCHEMA) -> str:
    from app.config import parse_db_url

    url = parse_db_url("RM_TEST_DATABASE_URL", PG_URL)
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote('-csearch_path=' + schema)}"


def reset_postgres_schema(schema: str = PG_SCHEMA) -> None:
    """Drop whatever an earlier run left and start from an empty schema."""
    from app.config import parse_db_url

    engine = sa.create_engine(parse_db_url("RM_TEST_DATABASE_URL", PG_URL))
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine.dispose()


def empty_database(dest_dir: str, name: str) -> str:
    """A URL to an empty, unmigrated database of its own (a file, or a PostgreSQL schema ``<run>_<name>``)."""
    if using_postgres():
        schema = f"{PG_SCHEMA}_{name}"
        reset_postgres_schema(schema)
        return pg_url_with_schema(schema)
    return "sqlite:///" + os.path.join(dest_dir, f"{name}.sqlite3")


def migrate(url: str, instance: str) -> None:
    """Bring the database at ``url`` to head by running the Alembic migrations."""
    import flask_migrate

    from app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": url, "INSTANCE_PATH": instance, "SECRET_KEY": "x"}, environ={})
    with app.app_context():
        flask_migrate.upgrade()
        from app.extensions import db

        db.engine.dispose()


DATA_TABLES = (
    "fleet_update_hosts",
    "fleet_updates",
    "agent_releases",
    "audit_events",
    "alerts",
    "jobs",
    "hosts",
    "api_tokens",
    "users",
    "login_throttle",
    "instances",
    "maintenance_windows",
)


def truncate_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        # TRUNCATE does not fire the audit log's row triggers: tests may start clean.
        conn.execute(sa.text(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


def fresh_database(template: str, dest_dir: str) -> str:
    """Return a URL to a migrated, empty database for one test."""
    if using_postgres():
        truncate_postgres(template)
        return template
    path = os.path.join(dest_dir, "test.sqlite3")
    shutil.copyfile(template, path)
    return "sqlite:///" + path


def module_app(db_template: str, tmp, **overrides):
    """Yield a real app (in its app context) on its own migrated database with a registered release.

    For module-scoped fixtures whose tests share one live server (RBAC matrix, property tests).
    """
    import os

    from app import create_app
    from app.extensions import db
    from app.updates import releases
    from tests.conftest import SERVER_VERSION, TEST_PASSWORD_HASH_METHOD

    config = {
        "TESTING": True,
        "INSTANCE_PATH": str(tmp / "instance"),
        "SQLALCHEMY_DATABASE_URI": fresh_database(db_template, str(tmp)),
        "SECRET_KEY": "module-secret",
        "VERSION": SERVER_VERSION,
        "BUILD_AGENT_ON_START": False,
        "PASSWORD_HASH_METHOD": TEST_PASSWORD_HASH_METHOD,
        **overrides,
    }
    app = create_app(config, environ={})
    with app.app_context():
        artifact = tmp / "artifact.pyz"
        artifact.write_bytes(os.urandom(2048))  # only scripted agents fetch nothing; bytes don't matter
        releases.register(str(artifact), SERVER_VERSION)
        yield app
        db.session.remove()
        db.engine.dispose()
