"""restic-manager server: the application factory.

Importing this package imports nothing heavy: ``restic-manager --help`` (app/cli.py, inside this
package) must not pay for Flask and SQLAlchemy. Only :func:`create_app` imports them.
"""

from __future__ import annotations

import logging
import os
import select
from typing import TYPE_CHECKING, Any

from agent.resources import resource_path

from . import config as cfg

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: dict[str, Any] | None = None, environ=None) -> Flask:
    """Build the app: defaults, then ``RM_*`` environment and instance file, then ``test_config``."""
    from flask import Flask

    from .extensions import LazyMigrate, csrf, db, login, sock

    environ = os.environ if environ is None else environ
    instance_path = (test_config or {}).get("INSTANCE_PATH") or environ.get("RM_INSTANCE_PATH")
    # Relative to the working directory, as for any command: ./instance unless RM_INSTANCE_PATH says.
    instance_path = os.path.abspath(instance_path or "instance")
    app = Flask(
        __name__,
        instance_path=instance_path,
        instance_relative_config=True,
        template_folder=resource_path("app", "templates"),
        static_folder="static",
    )
    os.makedirs(app.instance_path, exist_ok=True)

    app.config.from_mapping(cfg.defaults(app.instance_path))
    app.config.from_pyfile("config.py", silent=True)
    app.config.update(cfg.from_env(environ))
    if test_config:
        app.config.update(test_config)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = cfg.ensure_secret_key(app.instance_path)
    cfg.check(app.config)
    app.config["REMEMBER_COOKIE_SECURE"] = app.config["SESSION_COOKIE_SECURE"]
    cfg.agent_tls_context(app.config)  # a bad certificate or key stops start-up here, not at serve
    os.makedirs(app.config["RELEASES_DIR"], exist_ok=True)

    from .versioning import server_version

    app.config["SERVER_VERSION"] = server_version(app.config)
    _init_runtime(app)
    logging.basicConfig(level=app.config["LOG_LEVEL"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every scheduler run at INFO would drown the log; its warnings and errors still show.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)

    from . import inputs

    inputs.init_app(app)  # first: the id converter must be in place before any route is added
    _init_db(app)
    migrations = LazyMigrate(directory=resource_path("app", "migrations"), compare_type=True, render_as_batch=True)
    migrations.init_app(app, db)
    login.init_app(app)
    csrf.init_app(app)
    sock.init_app(app)
    from .agents.server import WebSocketReader

    # The agent plane's server needs to see the upgraded socket and its end (app/agents/server.py).
    app.config["SOCK_SERVER_OPTIONS"] = {**app.config["SOCK_SERVER_OPTIONS"], "thread_class": WebSocketReader}

    from . import auth, security
    from .agents import bp as agentlink_bp
    from .api import bp as api_bp
    from .auth import bp as auth_bp
    from .errors import register_error_handlers
    from .main import bp as main_bp

    app.register_blueprint(auth_bp)
    app.register_blueprint(main_bp)
    app.register_blueprint(api_bp, url_prefix="/api")
    app.register_blueprint(agentlink_bp)
    csrf.exempt(api_bp)  # the API does its own CSRF check for cookie sessions (see api/__init__.py)
    csrf.exempt(agentlink_bp)
    auth.init_login(app)
    security.init_app(app)
    register_error_handlers(app)

    from .updates import init_app as init_updates

    init_updates(app)
    from . import notify, oncommit

    oncommit.init_app()
    notify.init_app(app)

    from .metrics import init_app as init_metrics

    init_metrics(app)

    @app.context_processor
    def _inject_version():
        return {"server_version": app.config["SERVER_VERSION"]}

    from .cli import register_cli

    register_cli(app)
    return app


def _init_runtime(app: Flask) -> None:
    """The in-memory state (``app.runtime.runtime()``): registries, clock, scheduler, wake-ups."""
    from .agents.downloads import ActiveDownloads
    from .agents.presence import Presence
    from .agents.registry import ConnectionRegistry
    from .runtime import Runtime, install
    from .timeutil import Clock
    from .updates.inflight import InFlightRegistry

    install(
        app,
        Runtime(
            connections=ConnectionRegistry(),
            inflight=InFlightRegistry(),
            clock=Clock(),
            downloads=ActiveDownloads(),
            presence=Presence(),
        ),
    )


def _init_db(app: Flask) -> None:
    import sqlalchemy as sa

    from .extensions import db

    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    opts = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    if uri.startswith("sqlite"):
        connect_args = opts.setdefault("connect_args", {})
        connect_args.setdefault("timeout", 15)
        connect_args.setdefault("check_same_thread", False)
        if uri not in ("sqlite://", "sqlite:///:memory:"):
            # Keep connections instead of opening (and PRAGMA-ing) a new one for every checkout
            # past QueuePool's default 5, as thousands of agent threads did in a reconnect storm.
            opts.setdefault("pool_size", 20)
    else:
        opts.setdefault("pool_size", app.config["DB_POOL_SIZE"])
        opts.setdefault("max_overflow", app.config["DB_MAX_OVERFLOW"])
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = opts
    db.init_app(app)
    if not uri.startswith("sqlite") and "pool_pre_ping" not in opts:
        with app.app_context():
            sa.event.listen(db.engine, "checkout", _drop_if_server_spoke)
    if uri.startswith("sqlite"):
        with app.app_context():
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)


def _drop_if_server_spoke(dbapi_conn, _record, _proxy) -> None:
    """Check a pooled PostgreSQL connection before use, without a round trip (``pool_pre_ping`` costs one).

    An idle connection has nothing to read: the server sends on it only to end it (a restart, an
    administrator's terminate: an error message, then EOF). Anything readable, or a connection
    psycopg saw break, makes the pool replace it before the caller uses it.
    """
    try:
        # poll, not select: a server holding thousands of agent sockets has descriptors past
        # select()'s FD_SETSIZE (1024), where select raises ValueError for every checkout.
        readable = bool(dbapi_conn.closed)
        if not readable:
            poller = select.poll()
            poller.register(dbapi_conn.fileno(), select.POLLIN)
            readable = bool(poller.poll(0))
    except (OSError, ValueError, dbapi_conn.OperationalError):
        readable = True
    if readable:
        from sqlalchemy.exc import DisconnectionError

        raise DisconnectionError("the database ended this pooled connection")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=15000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
