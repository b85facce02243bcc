"""A rollout's strategy: how many hosts at once, how much failure, what to do about offline hosts.

Pure functions and a frozen dataclass, no database: parsing and validating the request's fields
(counts or percentages), resolving them against the number of selected hosts, and assigning
hosts to waves. The state machine that applies a strategy is :mod:`app.updates.fleet`;
docs/updates.md describes the policies.

The defaults are the seed's behaviour: no canary, one host at a time, halt at the first failure,
halt at an offline host (after its grace to reconnect).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import Refusal

#: What the rollout does about a host that is offline when its turn comes (docs/updates.md).
OFFLINE_POLICIES = ("halt", "skip", "wait")
#: ``offline=wait`` without a deadline waits this long for a host to come back.
DEFAULT_OFFLINE_DEADLINE_S = 3600.0
#: Bounds, so a typo cannot hold a rollout for a year or ask for a billion hosts.
MAX_COUNT = 100_000
MAX_SOAK_S = 7 * 24 * 3600.0
#: The request fields of a strategy (``POST /api/fleet/update`` and ``/api/fleet/plan``).
FIELDS = ("canary", "canary_soak_s", "max_in_flight", "max_failures", "wave_soak_s", "offline", "offline_deadline_s")

# No blanks, no leading zeros: exactly what docs/openapi.json's patterns accept.
_COUNT_OR_PERCENT = re.compile(r"^(0|[1-9][0-9]{0,5})(%?)$")


def _invalid(name: str, message: str) -> Refusal:
    return Refusal(400, "invalid_strategy", f"{name}: {message}")


def parse_amount(name: str, value, minimum: int) -> str:
    """``value`` (an int, ``"5"`` or ``"10%"``) as the canonical string stored on the rollout."""
    usage = f"must be a whole number from {minimum} to {MAX_COUNT}, or a percentage from {minimum}% to 100% ('10%')"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _invalid(name, usage)
    m = _COUNT_OR_PERCENT.match(str(value))
    if m is None or (isinstance(value, int) and value < 0):
        raise _invalid(name, f"{value!r}: {usage}")
    n, percent = int(m.group(1)), bool(m.group(2))
    if percent and not isinstance(value, str):
        raise _invalid(name, usage)
    if not minimum <= n <= (100 if percent else MAX_COUNT):
        raise _invalid(name, f"{value!r}: {usage}")
    return f"{n}%" if percent else str(n)


def resolve(amount: str, total: int, minimum: int) -> int:
    """A stored amount as a count of hosts out of ``total``.

    A percentage of the in-flight limit rounds up (10% of 5 hosts is one host at a time); of the
    failure budget it rounds down (5% of 30 hosts tolerates one failure, never two).
    """
    if amount.endswith("%"):
        pct = int(amount[:-1])
        n = math.ceil(total * pct / 100) if minimum > 0 else math.floor(total * pct / 100)
    else:
        n = int(amount)
    return max(minimum, n)


def _seconds(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, f"must be a number of seconds from 0 to {MAX_SOAK_S:g}")
    s = float(value)
    if not math.isfinite(s) or s < 0 or s > MAX_SOAK_S:
        raise _invalid(name, f"must be a number of seconds from 0 to {MAX_SOAK_S:g}")
    return s


@dataclass(frozen=True)
class Strategy:
    canary: int = 0
    canary_soak_s: float = 0.0
    max_in_flight: str = "1"
    max_failures: str = "0"
    wave_soak_s: float = 0.0
    offline: str = "halt"
    offline_deadline_s: float | None = None

    @classmethod
    def from_body(cls, body: dict | None) -> Strategy:
        """The strategy fields of a request body; absent fields take the defaults; 400 ``invalid_strategy``."""
        body = body or {}
        d = cls()
        canary = body.get("canary", d.canary)
        if isinstance(canary, bool) or not isinstance(canary, int) or not 0 <= canary <= MAX_COUNT:
            raise _invalid("canary", f"must be a whole number of hosts from 0 to {MAX_COUNT}")
        offline = body.get("offline", d.offline)
        if offline not in OFFLINE_POLICIES:
            raise _invalid("offline", f"must be one of {', '.join(OFFLINE_POLICIES)}, not {offline!r}")
        deadline = _seconds("offline_deadline_s", body.get("offline_deadline_s"), allow_none=True)
        # The deadline means something only to offline=wait; without a canary there is no canary soak.
        if offline != "wait":
            deadline = None
        elif deadline is None:
            deadline = DEFAULT_OFFLINE_DEADLINE_S
        canary_soak = _seconds("canary_soak_s", body.get("canary_soak_s", d.canary_soak_s))
        if not canary:
            canary_soak = 0.0
        return cls(
            canary=canary,
            canary_soak_s=canary_soak,
            max_in_flight=parse_amount("max_in_flight", body.get("max_in_flight", d.max_in_flight), 1),
            max_failures=parse_amount("max_failures", body.get("max_failures", d.max_failures), 0),
            wave_soak_s=_seconds("wave_soak_s", body.get("wave_soak_s", d.wave_soak_s)),
            offline=offline,
            offline_deadline_s=deadline,
        )

    @classmethod
    def of(cls, fu) -> Strategy:
        """The strategy stored on a rollout row (``FleetUpdate``)."""
        return cls(
            canary=fu.canary or 0,
            canary_soak_s=fu.canary_soak_s or 0.0,
            max_in_flight=fu.max_in_flight or "1",
            max_failures=fu.max_failures or "0",
            wave_soak_s=fu.wave_soak_s or 0.0,
            offline=fu.offline or "halt",
            offline_deadline_s=fu.offline_deadline_s,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self) -> dict:
        """The ``FleetUpdate`` column values."""
        return asdict(self)

    def in_flight(self, total: int) -> int:
        return resolve(self.max_in_flight, total, 1)

    def failure_budget(self, total: int) -> int:
        """How many failed hosts the rollout tolerates; one more halts it."""
        return resolve(self.max_failures, total, 0)

    def soak_before(self, wave: int) -> float:
        """Seconds of watching before ``wave`` starts (after the previous wave ended)."""
        if wave <= 0:
            return 0.0
        if wave == 1 and self.canary:
            return self.canary_soak_s
        return self.wave_soak_s

    def describe(self, total: int) -> str:
        """One line for people: ``canary 1 (soak 60 s), 5 at a time, halt after 2 failures, offline: wait``."""
        parts = []
        if self.canary:
            soak = f" (soak {self.canary_soak_s:g} s)" if self.canary_soak_s else ""
            parts.append(f"canary {min(self.canary, total)}{soak}")
        n = self.in_flight(total)
        parts.append("one host at a time" if n == 1 else f"{n} at a time")
        if self.wave_soak_s:
            parts.append(f"{self.wave_soak_s:g} s between waves")
        budget = self.failure_budget(total)
        parts.append("halt at the first failure" if budget == 0 else f"tolerate {budget} failure(s), halt at the next")
        if self.offline == "wait":
            parts.append(f"offline hosts: wait up to {self.offline_deadline_s or 0:g} s")
        else:
            parts.append(f"offline hosts: {self.offline}")
        return ", ".join(parts)


def assign_waves(total: int, strategy: Strategy) -> list[int]:
    """The wave of each of ``total`` hosts, in order: the canary first (wave 0), then waves of
    ``max_in_flight`` hosts. Without a canary the first wave is wave 0."""
    size = strategy.in_flight(total)
    canary = min(strategy.canary, total)
    waves = [0] * canary
    first = 1 if canary else 0
    for i in range(total - canary):
        waves.append(first + i // size)
    return waves
