"""The one polling helper of the test suite (and the benchmarks in scripts/bench)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    After ``timeout`` seconds (the predicate is always tried once more at the deadline) raise
    AssertionError naming ``what``; ``what`` may be a callable, evaluated only then, e.g. to
    attach a log tail.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {detail}")
        time.sleep(interval)
