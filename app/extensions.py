"""Extensions, created unbound here and bound to the app in :func:`app.create_app`."""

from flask_login import LoginManager
from flask_sock import Sock
from flask_sqlalchemy import SQLAlchemy
from flask_wtf import CSRFProtect
from sqlalchemy import MetaData

# Stable constraint names so Alembic migrations can refer to (and alter) them on both backends.
naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class LazyMigrate:
    """Flask-Migrate, bound to an app only when something migrates (``restic-manager db ...``, the
    demo, the tests' ``flask_migrate.upgrade()``). Importing Flask-Migrate imports Alembic, which
    would otherwise cost every server and command start-up that never migrates."""

    def __init__(self, **options):
        self.options = options

    def init_app(self, app, db) -> None:
        app.extensions["migrate"] = _UnboundMigrate(app, db, self.options)


class _UnboundMigrate:
    """Stands in ``app.extensions["migrate"]`` until first used, then binds the real Flask-Migrate
    (which puts its own config object there) and answers from it."""

    def __init__(self, app, db, options):
        self._app, self._db, self._options = app, db, options

    def __getattr__(self, name):
        from flask_migrate import Migrate

        Migrate(self._app, self._db, **self._options)
        return getattr(self._app.extensions["migrate"], name)


db = SQLAlchemy(metadata=MetaData(naming_convention=naming_convention))
login = LoginManager()
sock = Sock()
csrf = CSRFProtect()
