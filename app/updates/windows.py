"""Maintenance windows as calendar arithmetic: pure functions of a window and an instant.

A window is weekly: on each of its ``days`` (0 = Monday .. 6 = Sunday, local to its time zone)
it opens at ``start`` and closes at ``end`` ("HH:MM", wall-clock time in ``timezone``). An
``end`` at or before ``start`` closes on the next day (``22:00``-``02:00`` runs past midnight);
``end`` may be ``24:00`` (midnight at the end of the day). Every instant here is a naive UTC
``datetime``, as the database stores them; nothing reads a clock: the caller passes ``now``.

**Daylight-saving changes** (the rule, docs/updates.md "Maintenance windows"):

- A wall time that does not exist (spring forward: 02:00-02:59 on the last Sunday of March in
  Europe/Berlin) means the instant the clocks jumped to, the end of the gap (03:00 local). So a
  02:00-04:00 window opens at 03:00 that day and closes at 04:00, as the wall clock reads.
- A wall time that happens twice (fall back: 02:00-02:59 on the last Sunday of October in
  Berlin) means its first occurrence (``fold=0``). A 02:00-04:00 window opens at the first 02:00
  and stays open, once, through the repeated hour until 04:00 (three real hours).
- A window is never skipped: when both ends fall in the gap (or the start does and the end is
  the gap's end), the occurrence opens at the end of the gap and lasts its usual length.
  It is never doubled either: each local day gives at most one occurrence.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, available_timezones

from .. import labels as host_labels
from ..inputs import has_control_characters

UTC = dt.UTC
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
MAX_NAME = 100


class WindowError(ValueError):
    """A window's field is not valid; the message names the field."""


def parse_hhmm(value, field_name: str, allow_24: bool = False) -> int:
    """``"HH:MM"`` as minutes since midnight; ``24:00`` (1440) only for an end."""
    if not isinstance(value, str):
        raise WindowError(f'{field_name} must be a time as "HH:MM"')
    if allow_24 and value == "24:00":
        return 24 * 60
    m = _HHMM.match(value)
    if not m:
        raise WindowError(f'{field_name} must be a time as "HH:MM" (00:00 to 23:59{", or 24:00" if allow_24 else ""})')
    return int(m.group(1)) * 60 + int(m.group(2))


@functools.cache
def known_zones() -> frozenset[str]:
    """The IANA zone names this machine's time zone data has (the system's, else the tzdata package's)."""
    return frozenset(available_timezones() - {"localtime"})  # "localtime": the host's own, not a name


def parse_zone(name) -> ZoneInfo:
    """An IANA time zone (``Europe/Berlin``, ``UTC``) this server's zone data knows."""
    if not isinstance(name, str) or not name:
        raise WindowError("timezone must be an IANA time zone name such as Europe/Berlin or UTC")
    if name not in known_zones():
        raise WindowError(f"timezone {name[:64]!r} is not a known IANA time zone (e.g. Europe/Berlin, UTC)")
    return ZoneInfo(name)


def parse_days(value) -> tuple[int, ...]:
    """A non-empty list of weekday numbers, 0 = Monday .. 6 = Sunday (sorted, each once)."""
    if not isinstance(value, list) or not value:
        raise WindowError("days must be a non-empty list of weekdays, 0 = Monday .. 6 = Sunday")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 6 for d in value):
        raise WindowError("days must list weekdays as numbers 0 (Monday) to 6 (Sunday)")
    if len(set(value)) != len(value):
        raise WindowError("days lists a weekday more than once")
    return tuple(sorted(value))


def parse_day_names(names) -> list[int]:
    """``["sat", "Sunday"]`` or ``["5", "6"]`` as weekday numbers (the CLI's and the page's form)."""
    full = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    out = []
    for raw in names:
        n = str(raw).strip().lower()
        if n.isdigit() and len(n) == 1:
            out.append(int(n))
        elif n in full or n in [f[:3] for f in full]:
            out.append([f[:3] for f in full].index(n[:3]))
        else:
            raise WindowError(f"day {raw!r} is not a weekday (mon..sun or 0..6)")
    return out


def resolve_local(day: dt.date, minutes: int, zone: ZoneInfo) -> dt.datetime:
    """The UTC instant (naive) of wall time ``minutes`` after local midnight of ``day`` in ``zone``."""
    day = day + dt.timedelta(days=minutes // 1440)
    minutes %= 1440
    return resolve_wall(dt.datetime.combine(day, dt.time(minutes // 60, minutes % 60)), zone)


def resolve_wall(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The UTC instant (naive) a naive wall-clock time in ``zone`` means.

    A wall time in a spring-forward gap resolves to the end of the gap; an ambiguous one (fall
    back) to its first occurrence.
    """
    local = wall.replace(tzinfo=zone, fold=0)  # fold=0: the first occurrence
    instant = local.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) != wall.replace(fold=0):
        # Not a real wall time (a gap): fold=0 read it with the offset from before the jump; the
        # gap ends at the first instant whose wall time is later than the one asked for.
        instant = _gap_end(local, zone)
    return instant.replace(tzinfo=None)


def _gap_end(local: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The instant a spring-forward gap containing wall time ``local`` ended (clocks jumped)."""
    pre, post = local.replace(fold=0).utcoffset(), local.replace(fold=1).utcoffset()
    wall = local.replace(tzinfo=None, fold=0)
    # Read with the offset after the jump the wall time lies before the transition, read with
    # the one before it lies after: the transition is in between; find its (whole) second.
    lo = int((wall - post).replace(tzinfo=UTC).timestamp())
    hi = int((wall - pre).replace(tzinfo=UTC).timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, UTC).astimezone(zone).utcoffset() == post:
            hi = mid
        else:
            lo = mid
    return dt.datetime.fromtimestamp(hi, UTC)


@dataclass(frozen=True)
class Occurrence:
    """One opening of a window: ``[opens, closes)`` in naive UTC."""

    opens: dt.datetime
    closes: dt.datetime

    def contains(self, t: dt.datetime) -> bool:
        return self.opens <= t < self.closes


@dataclass(frozen=True)
class Window:
    """A validated weekly window (see the module docstring)."""

    name: str
    days: tuple[int, ...]
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight; 1440 is 24:00; <= start runs into the next day (== start: 24 h)
    zone: ZoneInfo
    labels: Mapping[str, str] = field(default_factory=dict)
    id: int | None = None

    @classmethod
    def parse(cls, name, days, start, end, timezone, labels, id: int | None = None) -> Window:
        """Validate the fields as an operator gave them; :class:`WindowError` names the bad one.

        Bad ``labels`` are refused as host labels are (``Refusal(400, "invalid_labels")``).
        """
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or has_control_characters(name):
            raise WindowError(f"name must be 1 to {MAX_NAME} characters, without control characters")
        s = parse_hhmm(start, "start")
        e = parse_hhmm(end, "end", allow_24=True)
        return cls(name, parse_days(days), s, e, parse_zone(timezone), host_labels.validate(labels), id)

    @classmethod
    def from_row(cls, row) -> Window:
        """From a ``MaintenanceWindow`` row (already validated when it was written)."""
        return cls.parse(row.name, list(row.days), row.start, row.end, row.timezone, row.labels, row.id)

    @property
    def length(self) -> dt.timedelta:
        """The nominal length on a day without a clock change."""
        minutes = self.end - self.start if self.end > self.start else self.end + 1440 - self.start
        return dt.timedelta(minutes=minutes)

    def applies_to(self, labels: Mapping | None) -> bool:
        return host_labels.matches(labels, self.labels)

    def occurrence_on(self, day: dt.date) -> Occurrence | None:
        """The opening that starts on local date ``day``, or None when ``day`` is not one of its days."""
        if day.weekday() not in self.days:
            return None
        opens = resolve_local(day, self.start, self.zone)
        end_minutes = self.end if self.end > self.start else self.end + 1440
        closes = resolve_local(day, end_minutes, self.zone)
        if closes <= opens:  # both ends in a spring-forward gap: never skip the window
            closes = opens + self.length
        return Occurrence(opens, closes)

    def _occurrences_from(self, t: dt.datetime) -> Iterable[Occurrence]:
        """Occurrences that close after ``t``, in order (starting a day back for overnight windows)."""
        local_day = t.replace(tzinfo=UTC).astimezone(self.zone).date()
        for offset in range(-2, 10):
            occ = self.occurrence_on(local_day + dt.timedelta(days=offset))
            if occ is not None and occ.closes > t:
                yield occ

    def current_or_next(self, t: dt.datetime) -> Occurrence:
        """The occurrence open at ``t``, else the next one to open."""
        return next(iter(self._occurrences_from(t)))

    def is_open(self, t: dt.datetime) -> bool:
        return self.current_or_next(t).contains(t)

    def next_open(self, t: dt.datetime) -> dt.datetime:
        """When it next opens after ``t`` (if it is open at ``t``: the opening after this one)."""
        for occ in self._occurrences_from(t):
            if occ.opens > t:
                return occ.opens
        raise AssertionError("a weekly window opens within 9 days")  # pragma: no cover

    def next_close(self, t: dt.datetime) -> dt.datetime:
        """When the occurrence open at ``t`` (or else the next one) closes."""
        return self.current_or_next(t).closes

    def describe(self) -> str:
        """``Sat, Sun 02:00-04:00 Europe/Berlin``."""
        days = ", ".join(DAY_NAMES[d] for d in self.days)
        return f"{days} {format_minutes(self.start)}-{format_minutes(self.end)} {self.zone.key}"


def format_minutes(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class Wait:
    """A host outside all of its windows: the window that opens first, and when."""

    window: str
    opens_at: dt.datetime


def gate(windows: Iterable[Window], labels: Mapping | None, t: dt.datetime) -> Wait | None:
    """None when a host carrying ``labels`` may be updated at ``t``; else what it waits for.

    A host may be updated when one of the windows that apply to it is open, or when none applies
    (a host without a maintenance window is not restricted).
    """
    applying = [w for w in windows if w.applies_to(labels)]
    if not applying:
        return None
    best: Wait | None = None
    for w in applying:
        occ = w.current_or_next(t)
        if occ.contains(t):
            return None
        if best is None or occ.opens < best.opens_at:
            best = Wait(w.name, occ.opens)
    return best
