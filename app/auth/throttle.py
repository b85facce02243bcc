"""Password login with throttling that does not tell which usernames exist.

Every failed login counts against two keys, whether the name exists or not: the name
(``name:<username>``) and the remote address (``addr:<address>``). When either key reaches
``LOGIN_MAX_FAILURES`` failures it is locked for ``LOGIN_LOCKOUT_S``; while the name or the
address is locked, every attempt (even with the right password) answers the same "try again"
message. A name that does not exist costs the same password-hash check against a dummy hash, and
the same database writes, so neither the answers nor their timing tell an attacker anything.

The counts live in the database (``login_throttle``), so a lock-out survives a restart and the CLI
(``users set-password``, ``users enable``) can lift a name's lock. Failures older than
``FAILURE_MEMORY_S`` are forgotten; the table is pruned as failures come in.

Flask-Limiter was considered and not used: it refuses with its own 429 before the view runs (this
answer must be the login page with the same message as a wrong password), counts requests rather
than failures keyed by a form field, and its storage reads the wall clock, which tests cannot
move.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from dataclasses import dataclass

import sqlalchemy as sa
from flask import current_app
from werkzeug.security import check_password_hash, generate_password_hash

from ..extensions import db
from ..models import AuditEvent, LoginThrottle, User, password_hash_method
from ..timeutil import utcnow

INVALID = "Invalid username or password."
DISABLED = "This account is disabled. Ask an administrator to enable it."
#: A failure this long after the previous one on the same key starts the count again.
FAILURE_MEMORY_S = 24 * 3600.0
KEY_MAX = 200

_dummy_hashes: dict[str, str] = {}  # one per hash method, so unknown names cost what known ones do
_dummy_lock = threading.Lock()


def locked_message(seconds: float) -> str:
    return f"Too many failed attempts. Try again in {max(1, math.ceil(seconds))} seconds."


def name_key(username: str) -> str:
    return f"name:{username}"[:KEY_MAX]


def addr_key(remote: str) -> str:
    return f"addr:{remote}"[:KEY_MAX]


@dataclass
class LoginResult:
    user: User | None
    error: str | None = None


def locked_for(keys: list[str], now: dt.datetime) -> float:
    """Seconds until none of ``keys`` is locked (0 when none is)."""
    until = db.session.scalar(
        sa.select(sa.func.max(LoginThrottle.locked_until)).where(
            LoginThrottle.key.in_(keys), LoginThrottle.locked_until > now
        )
    )
    return 0.0 if until is None else (until - now).total_seconds()


def _insert(table):
    if db.engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def record_failure(keys: list[str], now: dt.datetime, max_failures: int, lockout_s: float) -> bool:
    """Count one failure against each key (atomically); return True when it locks any of them."""
    t = LoginThrottle.__table__
    forgotten = now - dt.timedelta(seconds=FAILURE_MEMORY_S)
    locked = False
    for key in keys:
        ins = _insert(t).values(key=key, failures=1, last_failure_at=now)
        count = sa.case((t.c.last_failure_at < forgotten, 1), else_=t.c.failures + 1)
        stmt = ins.on_conflict_do_update(
            index_elements=[t.c.key], set_={"failures": count, "last_failure_at": now}
        ).returning(t.c.failures)
        if db.session.execute(stmt).scalar_one() >= max_failures:
            until = now + dt.timedelta(seconds=lockout_s)
            db.session.execute(sa.update(LoginThrottle).where(t.c.key == key).values(failures=0, locked_until=until))
            locked = True
    db.session.execute(
        sa.delete(LoginThrottle).where(
            LoginThrottle.last_failure_at < forgotten,
            sa.or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until <= now),
        )
    )
    return locked


def lift(username: str) -> None:
    """Forget a name's failures and lock (a new password or a re-enabled account starts clean)."""
    db.session.execute(sa.delete(LoginThrottle).where(LoginThrottle.key == name_key(username)))


def _check(user: User | None, password: str) -> bool:
    """Check the password; for no user, spend the same hash time against a dummy hash."""
    if user is not None:
        return user.check_password(password)
    method = password_hash_method()
    with _dummy_lock:
        dummy = _dummy_hashes.get(method)
        if dummy is None:
            dummy = _dummy_hashes[method] = generate_password_hash("not-a-real-password", method=method)
    check_password_hash(dummy, password)
    return False


def attempt(username: str, password: str, remote: str) -> LoginResult:
    """Check a username and password, apply the throttle, audit the outcome, and commit."""
    cfg = current_app.config
    max_failures, lockout_s = int(cfg["LOGIN_MAX_FAILURES"]), float(cfg["LOGIN_LOCKOUT_S"])
    now = utcnow()
    keys = [name_key(username), addr_key(remote)]
    user = db.session.scalar(sa.select(User).where(User.username == username))

    remaining = locked_for(keys, now)
    if remaining > 0:
        _check(None, password)
        return _failed(username, remote, "locked", locked_message(remaining))

    if not _check(user, password):
        locked = record_failure(keys, now, max_failures, lockout_s)
        # The audit keeps the truth; the answer is the same for a wrong password and an unknown name.
        reason = "unknown_user" if user is None else "bad_password"
        return _failed(username, remote, reason, locked_message(lockout_s) if locked else INVALID)

    if not user.is_active:
        # Only a caller who knows the password learns the account is disabled.
        return _failed(username, remote, "disabled", DISABLED)

    lift(username)
    AuditEvent.record(user.username, "auth.login", user.username, remote=remote)
    db.session.commit()
    return LoginResult(user)


def _failed(username: str, remote: str, reason: str, message: str) -> LoginResult:
    AuditEvent.record("anonymous", "auth.login_failed", username[:128], reason=reason, remote=remote)
    db.session.commit()
    return LoginResult(None, message)
