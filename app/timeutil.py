"""Time, read through an injectable clock so tests never sleep through a deadline."""

from __future__ import annotations

import datetime as dt
import threading

from flask import has_app_context

from .runtime import runtime


class Clock:
    """Wall clock in naive UTC (what the database stores)."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class FakeClock(Clock):
    """A clock that only moves when told to; for tests."""

    def __init__(self, start: dt.datetime | None = None):
        self._now = start or dt.datetime(2026, 1, 1, 12, 0, 0)
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> dt.datetime:
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)
            return self._now


_default = Clock()


def utcnow() -> dt.datetime:
    if has_app_context():
        return runtime().clock.now()
    return _default.now()


def isoformat(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=value.microsecond).isoformat() + "Z"
