"""Run a callback after the current transaction commits, never if it rolls back.

``on_commit(fn, *args)`` queues ``fn(*args)`` on the session; after the outermost transaction
commits, the queued callbacks run in order in the committing thread, and a rollback (or a session
closed without a commit) drops them. Savepoints (``begin_nested``) neither run nor drop them.
This is how an event raised inside a transaction (a new alert, a rollout that finished) is
announced only once it is on record — the same idea as Django's ``transaction.on_commit``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .extensions import db

log = logging.getLogger(__name__)

_KEY = "rm.on_commit"


def on_commit(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` after the current transaction of ``db.session`` commits."""
    db.session().info.setdefault(_KEY, []).append((fn, args))


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: the outer transaction may still roll back
    pending = session.info.pop(_KEY, None) or []
    for fn, args in pending:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the commit happened; a callback must not undo the caller
            log.exception("after-commit callback %r failed", fn)


def _after_transaction_end(session: Session, transaction) -> None:
    if transaction.parent is None:
        session.info.pop(_KEY, None)  # ended without a commit (a commit ran them already)


def init_app() -> None:
    """Listen on the app's sessions (once per process: ``db.session`` is shared by every app)."""
    for name, fn in (("after_commit", _after_commit), ("after_transaction_end", _after_transaction_end)):
        if not sa.event.contains(db.session, name, fn):
            sa.event.listen(db.session, name, fn)
