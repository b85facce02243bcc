"""Password login with throttling.

A known username is locked in the database after ``LOGIN_MAX_FAILURES`` consecutive failures,
for ``LOGIN_LOCKOUT_S``. Unknown usernames are throttled per remote address in memory with the
same numbers, and cost the same password-hash check, so the answers (and their timing) do not
tell an attacker which usernames exist.
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
from ..models import AuditEvent, User
from ..timeutil import utcnow

INVALID = "Invalid username or password."
_dummy_hash: str | None = None
_dummy_lock = threading.Lock()

#: Bound the in-memory table so a spray of addresses cannot grow it without limit.
MAX_TRACKED_ADDRESSES = 10_000


def locked_message(seconds: float) -> str:
    return f"Too many failed attempts. Try again in {max(1, math.ceil(seconds))} seconds."


@dataclass
class LoginResult:
    user: User | None
    error: str | None = None


@dataclass
class _Entry:
    failures: int = 0
    locked_until: dt.datetime | None = None


class AddressThrottle:
    """Failures for unknown usernames, per remote address (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_addr: dict[str, _Entry] = {}

    def locked_for(self, addr: str, now: dt.datetime) -> float:
        """Seconds this address remains locked (0 when it is not)."""
        with self._lock:
            e = self._by_addr.get(addr)
            if e is None or e.locked_until is None:
                return 0.0
            if e.locked_until <= now:
                del self._by_addr[addr]
                return 0.0
            return (e.locked_until - now).total_seconds()

    def fail(self, addr: str, now: dt.datetime, max_failures: int, lockout_s: float) -> bool:
        """Count a failure; return True when it locks the address."""
        with self._lock:
            if len(self._by_addr) >= MAX_TRACKED_ADDRESSES:
                self._purge(now)
            e = self._by_addr.setdefault(addr, _Entry())
            e.failures += 1
            if e.failures >= max_failures:
                e.failures = 0
                e.locked_until = now + dt.timedelta(seconds=lockout_s)
                return True
            return False

    def _purge(self, now: dt.datetime) -> None:
        for addr, e in list(self._by_addr.items()):
            if e.locked_until is None or e.locked_until <= now:
                del self._by_addr[addr]
        if len(self._by_addr) >= MAX_TRACKED_ADDRESSES:
            self._by_addr.clear()


def _burn_hash_time(password: str) -> None:
    """Spend what a real password check costs, so unknown names answer as slowly as known ones."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = generate_password_hash("not-a-real-password")
    check_password_hash(_dummy_hash, password)


def attempt(username: str, password: str, remote: str) -> LoginResult:
    """Check a username and password, apply the throttle, audit the outcome, and commit."""
    cfg = current_app.config
    max_failures, lockout_s = int(cfg["LOGIN_MAX_FAILURES"]), float(cfg["LOGIN_LOCKOUT_S"])
    now = utcnow()
    user = db.session.scalar(sa.select(User).where(User.username == username))

    if user is None:
        throttle: AddressThrottle = current_app.extensions["rm.login_throttle"]
        remaining = throttle.locked_for(remote, now)
        _burn_hash_time(password)
        if remaining > 0:
            return _failed(username, remote, "locked", locked_message(remaining))
        locked = throttle.fail(remote, now, max_failures, lockout_s)
        return _failed(username, remote, "unknown_user", locked_message(lockout_s) if locked else INVALID)

    if user.locked_until is not None and user.locked_until > now:
        _burn_hash_time(password)
        return _failed(username, remote, "locked", locked_message((user.locked_until - now).total_seconds()))

    if not user.check_password(password):
        # One UPDATE, so two concurrent wrong guesses both count.
        db.session.execute(sa.update(User).where(User.id == user.id).values(failed_logins=User.failed_logins + 1))
        db.session.refresh(user)
        message = INVALID
        if user.failed_logins >= max_failures:
            user.failed_logins = 0
            user.locked_until = now + dt.timedelta(seconds=lockout_s)
            message = locked_message(lockout_s)
        return _failed(username, remote, "bad_password", message)

    user.failed_logins = 0
    user.locked_until = None
    AuditEvent.record(user.username, "auth.login", user.username, remote=remote)
    db.session.commit()
    return LoginResult(user)


def _failed(username: str, remote: str, reason: str, message: str) -> LoginResult:
    AuditEvent.record("anonymous", "auth.login_failed", username[:128], reason=reason, remote=remote)
    db.session.commit()
    return LoginResult(None, message)
