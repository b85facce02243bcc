"""The run report of a rollout: each host's dispatch, finish, phases and outcome; a summary; a timeline.

Read-only: it reads ``fleet_updates``, ``fleet_update_hosts``, ``jobs`` and ``job_phases`` (three
queries whatever the rollout's size) and changes nothing, so it works for a running rollout (a
partial report: running hosts' bars end at "now") and for rollouts from before phases were
recorded (their hosts' ``phases`` are ``null``). The same dict feeds the JSON, the CSV and the
page; the timeline is drawn here as SVG, server-side, so it needs no script and prints.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from dataclasses import dataclass, field

import sqlalchemy as sa
from markupsafe import Markup, escape

from agent.protocol import UPDATE_PHASES

from ..errors import Refusal
from ..extensions import db
from ..models import FLEET_HOST_STATUSES, FleetUpdate, FleetUpdateHost, Host, Job, JobPhase
from ..timeutil import isoformat, utcnow

#: What a host's line says happened to it: a row status, or ``waiting`` (pending, and the rollout
#: is waiting for it: offline, or outside its maintenance window).
OUTCOMES = (*FLEET_HOST_STATUSES, "waiting")
#: The phases a report times: the dispatch (until the agent's first progress report), then the agent's.
PHASES = ("dispatched", *UPDATE_PHASES)
#: The timeline's colour per outcome (SVG ``fill``: a presentation attribute, so the strict CSP and
#: printing both keep it). Colour-blind-safe pairs: blue/orange/grey rather than red/green alone.
COLOURS = {
    "succeeded": "#1a7f37",
    "failed": "#cf222e",
    "cancelled": "#9a6700",
    "skipped": "#8c959f",
    "running": "#0969da",
    "pending": "#d0d7de",
    "waiting": "#bf8700",
}
WAIT_COLOUR = "#f2cc60"
#: Above this many hosts the timeline draws thin rows without names (each bar keeps a tooltip)
#: inside a scrolling box; the per-wave table gives the aggregate view.
NAMED_ROWS_MAX = 120
MAX_REASON_CHARS = 200


# --- the summary's arithmetic ---------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100): always one of the observed values.

    ``percentile([1, 2, 3, 4], 50) == 2``; ``percentile(range(1, 101), 95) == 95``. None for no values.
    """
    if not values:
        return None
    xs = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(xs)))
    return xs[min(rank, len(xs)) - 1]


_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_HEX = re.compile(r"\b[0-9a-f]{16,}\b", re.I)
_VERSION = re.compile(r"(?<![\w.])v?\d+(?:\.\d+)+(?:[-+][0-9A-Za-z.+-]*)?(?![\w])")
_NUMBER = re.compile(r"(?<![\w<.-])\d+(?:\.\d+)?(?![\w])")
_SPACE = re.compile(r"\s+")


def failure_reason(error: str | None, host_name: str | None = None) -> str:
    """``error`` with what differs from host to host taken out, so that like failures group together.

    The host's own name becomes ``<host>``, job ids ``<id>``, digests ``<hash>``, versions
    ``<version>`` and other numbers ``<n>`` ("timed out after 90 s waiting for version 2.0.0" and
    "... 120 s ... 2.0.1" are one reason); whitespace is collapsed and the text cut at 200 characters.
    """
    text = _SPACE.sub(" ", (error or "").strip()) or "no reason given"
    if host_name:
        text = re.sub(rf"(?<![\w.-]){re.escape(host_name)}(?![\w.-])", "<host>", text)
    text = _UUID.sub("<id>", text)
    text = _HEX.sub("<hash>", text)
    text = _VERSION.sub("<version>", text)
    text = _NUMBER.sub("<n>", text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else round(max(0.0, (b - a).total_seconds()), 3)


# --- one host's line --------------------------------------------------------------------------------


@dataclass
class HostLine:
    position: int
    wave: int
    host_id: int | None
    name: str
    outcome: str
    from_version: str | None
    target_version: str | None
    job_id: str | None
    dispatched_at: dt.datetime | None
    finished_at: dt.datetime | None
    waiting_since: dt.datetime | None
    error: str | None
    window_waiting_since: dt.datetime | None = None  # held back by respect_windows since
    window_name: str | None = None
    phases: list[dict] | None = None  # None: not recorded (a rollout from before job_phases)
    end: dt.datetime | None = None  # where its bar ends: the finish, or "now" while it runs

    @property
    def duration_s(self) -> float | None:
        return _seconds(self.dispatched_at, self.finished_at)

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "wave": self.wave,
            "host_id": self.host_id,
            "name": self.name,
            "outcome": self.outcome,
            "from_version": self.from_version,
            "target_version": self.target_version,
            "job_id": self.job_id,
            "dispatched_at": isoformat(self.dispatched_at),
            "finished_at": isoformat(self.finished_at),
            "duration_s": self.duration_s,
            "waiting_since": isoformat(self.waiting_since),
            "window_waiting_since": isoformat(self.window_waiting_since),
            "window_name": self.window_name,
            "phases": self.phases,
            "error": self.error,
            "reason": failure_reason(self.error, self.name) if self.error else None,
        }


def _phase_times(
    dispatched: dt.datetime, entered: list[tuple[str, dt.datetime]], end: dt.datetime | None
) -> list[dict]:
    """Each phase from when it began to when the next did (the last until ``end``, open while running)."""
    marks = [("dispatched", dispatched), *sorted(entered, key=lambda m: m[1])]
    out = []
    for i, (phase, at) in enumerate(marks):
        until = marks[i + 1][1] if i + 1 < len(marks) else end
        out.append({"phase": phase, "started_at": isoformat(at), "duration_s": _seconds(at, until)})
    return out


@dataclass
class Report:
    fleet: dict
    now: dt.datetime
    start: dt.datetime
    end: dt.datetime
    lines: list[HostLine] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fleet_update": self.fleet, "summary": self.summary(), "hosts": [h.to_dict() for h in self.lines]}

    # --- the summary ---

    def summary(self) -> dict:
        counts = dict.fromkeys(OUTCOMES, 0)
        for h in self.lines:
            counts[h.outcome] += 1
        durations = [d for h in self.lines if h.finished_at is not None and (d := h.duration_s) is not None]
        running = self.fleet["status"] in ("running", "scheduled")
        return {
            "generated_at": isoformat(self.now),
            "partial": running,
            "total": len(self.lines),
            "counts": counts,
            "duration_s": {
                "count": len(durations),
                "p50": percentile(durations, 50),
                "p95": percentile(durations, 95),
                "max": max(durations) if durations else None,
            },
            "wall_time_s": _seconds(self.start, self.end),
            "failures": self.failures(),
            "skipped": self.skips(),
            "waits": self.waits(),
            "waves": self.waves(),
        }

    def failures(self) -> list[dict]:
        """Failed (and cut-short) hosts grouped by :func:`failure_reason`, the largest group first."""
        return self._grouped(lambda h: h.outcome == "failed" or (h.outcome == "cancelled" and h.dispatched_at))

    def skips(self) -> list[dict]:
        """Hosts skipped with a reason (by an admin, offline past a deadline), grouped the same way."""
        return self._grouped(lambda h: h.outcome == "skipped" and h.error)

    def _grouped(self, which) -> list[dict]:
        groups: dict[str, dict] = {}
        for h in self.lines:
            if which(h):
                reason = failure_reason(h.error, h.name)
                g = groups.setdefault(reason, {"reason": reason, "count": 0, "hosts": [], "example": h.error})
                g["count"] += 1
                g["hosts"].append(h.name)
        return sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))

    def waits(self) -> list[dict]:
        """The hosts the rollout waited on, and why: ``offline`` (from ``waiting_since``) or
        ``window`` (held back by ``respect_windows``: ``window_waiting_since``, ``window``)."""
        out = []
        for h in self.lines:
            until = h.dispatched_at or h.finished_at
            for reason, since in (("window", h.window_waiting_since), ("offline", h.waiting_since)):
                if since is None:
                    continue
                out.append(
                    {
                        "host_id": h.host_id,
                        "name": h.name,
                        "reason": reason,
                        "window": h.window_name if reason == "window" else None,
                        "outcome": h.outcome,
                        "since": isoformat(since),
                        "until": isoformat(until),
                        "waited_s": _seconds(since, until or self.now),
                        "still_waiting": until is None and self.fleet["status"] == "running",
                    }
                )
        return out

    def waves(self) -> list[dict]:
        out: dict[int, dict] = {}
        for h in self.lines:
            w = out.setdefault(
                h.wave, {"wave": h.wave, "hosts": 0, "counts": {}, "first_dispatch": None, "last_finish": None}
            )
            w["hosts"] += 1
            w["counts"][h.outcome] = w["counts"].get(h.outcome, 0) + 1
            if h.dispatched_at is not None and (w["first_dispatch"] is None or h.dispatched_at < w["first_dispatch"]):
                w["first_dispatch"] = h.dispatched_at
            if h.finished_at is not None and (w["last_finish"] is None or h.finished_at > w["last_finish"]):
                w["last_finish"] = h.finished_at
        waves = [out[k] for k in sorted(out)]
        for w in waves:
            w["duration_s"] = _seconds(w["first_dispatch"], w["last_finish"])
            w["first_dispatch"], w["last_finish"] = isoformat(w["first_dispatch"]), isoformat(w["last_finish"])
        return waves

    # --- CSV ---

    def csv(self) -> str:
        """One row per host; each phase's seconds in its own column. Text cells that a spreadsheet
        would run as a formula (leading ``= + - @``) get a leading ``'``."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(CSV_COLUMNS)
        for h in self.lines:
            d = h.to_dict()
            phase_s = {p["phase"]: p["duration_s"] for p in (h.phases or [])}
            w.writerow(
                [
                    d["position"],
                    d["wave"],
                    _cell(d["name"]),
                    d["host_id"],
                    d["outcome"],
                    _cell(d["from_version"]),
                    _cell(d["target_version"]),
                    d["dispatched_at"],
                    d["finished_at"],
                    d["duration_s"],
                    d["waiting_since"],
                    d["window_waiting_since"],
                    _cell(d["window_name"]),
                    *[phase_s.get(p) for p in PHASES],
                    _cell(d["error"]),
                    _cell(d["reason"]),
                ]
            )
        return buf.getvalue()

    # --- the timeline ---

    def timeline_svg(self) -> Markup:
        return timeline_svg(self)


CSV_COLUMNS = (
    "position",
    "wave",
    "host",
    "host_id",
    "outcome",
    "from_version",
    "target_version",
    "dispatched_at",
    "finished_at",
    "duration_s",
    "waiting_since",
    "window_waiting_since",
    "window",
    *[f"{p}_s" for p in PHASES],
    "error",
    "reason",
)


def csv_filename(fleet_id: int) -> str:
    return f"fleet-update-{fleet_id}-report.csv"


def _cell(value: str | None) -> str | None:
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value


# --- building it from the database ------------------------------------------------------------


def build(fleet_id: int, now: dt.datetime | None = None) -> Report:
    """The report of rollout ``fleet_id`` as the database has it now; 404 ``fleet_update_not_found``."""
    now = now or utcnow()
    fu = db.session.get(FleetUpdate, fleet_id)
    if fu is None:
        raise Refusal(404, "fleet_update_not_found", f"no fleet update with id {fleet_id}")
    rows = db.session.execute(
        sa.select(
            FleetUpdateHost.position,
            FleetUpdateHost.wave,
            FleetUpdateHost.host_id,
            sa.func.coalesce(Host.name, FleetUpdateHost.host_name),
            FleetUpdateHost.status,
            FleetUpdateHost.from_version,
            FleetUpdateHost.target_version,
            FleetUpdateHost.job_id,
            FleetUpdateHost.started_at,
            FleetUpdateHost.finished_at,
            FleetUpdateHost.waiting_since,
            FleetUpdateHost.error,
            Job.phase,
            Job.finished_at,
            Job.error,
            FleetUpdateHost.window_waiting_since,
            FleetUpdateHost.window_name,
        )
        .outerjoin(Host, Host.id == FleetUpdateHost.host_id)
        .outerjoin(Job, Job.id == FleetUpdateHost.job_id)
        .where(FleetUpdateHost.fleet_update_id == fleet_id)
        .order_by(FleetUpdateHost.position)
    ).all()
    entered: dict[str, list[tuple[str, dt.datetime]]] = {}
    for job_id, phase, at in db.session.execute(
        sa.select(JobPhase.job_id, JobPhase.phase, JobPhase.at)
        .join(FleetUpdateHost, FleetUpdateHost.job_id == JobPhase.job_id)
        .where(FleetUpdateHost.fleet_update_id == fleet_id)
    ):
        entered.setdefault(job_id, []).append((phase, at))

    start = fu.started_at or fu.created_at
    report = Report(fleet=_fleet_dict(fu), now=now, start=start, end=fu.finished_at or now)
    for r in rows:
        (position, wave, host_id, name, status, from_v, target_v, job_id, dispatched, finished, waiting) = r[:11]
        row_error, job_phase, job_finished, job_error, window_since, window_name = r[11:]
        if status == "running" and job_finished is not None:
            finished = job_finished  # the job ended; the next tick settles the row
        waited = waiting is not None or window_since is not None
        outcome = "waiting" if status == "pending" and waited else status
        line = HostLine(
            position=position,
            wave=wave or 0,
            host_id=host_id,
            name=name or f"host {host_id}",
            outcome=outcome,
            from_version=from_v,
            target_version=target_v or fu.target_version,
            job_id=job_id,
            dispatched_at=dispatched,
            finished_at=finished,
            waiting_since=waiting,
            error=row_error or (job_error if status in ("failed", "cancelled") else None),
            window_waiting_since=window_since,
            window_name=window_name,
        )
        if dispatched is not None:
            line.end = finished or (now if status == "running" else None)
            marks = entered.get(job_id or "", [])
            # A job that reported phases, or one still at "dispatched", has its phases on record; one
            # that got past them without rows predates job_phases (migration 0010): unknown.
            if marks or job_phase in (None, "dispatched"):
                line.phases = _phase_times(dispatched, marks, line.end)
        report.lines.append(line)
    return report


def _fleet_dict(fu: FleetUpdate) -> dict:
    return {
        "id": fu.id,
        "kind": fu.kind,
        "status": fu.status,
        "target_version": fu.target_version,
        "created_by": fu.created_by,
        "created_at": isoformat(fu.created_at),
        "started_at": isoformat(fu.started_at or fu.created_at),
        "finished_at": isoformat(fu.finished_at),
        "halt_reason": fu.halt_reason,
        "max_in_flight": fu.max_in_flight,
        "canary": fu.canary,
    }


# --- the timeline as SVG ------------------------------------------------------------------------

_TICKS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
WIDTH = 960
AXIS_H = 22


def _tick_step(span_s: float, most: int = 10) -> int:
    for step in _TICKS_S:
        if span_s / step <= most:
            return step
    return _TICKS_S[-1] * math.ceil(span_s / (_TICKS_S[-1] * most))


def _tick_label(s: int) -> str:
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" if s % 60 == 0 else f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h" if s % 3600 == 0 else f"{s // 3600} h {(s % 3600) // 60} min"


def timeline_svg(report: Report) -> Markup:
    """One bar per dispatched host from dispatch to finish, coloured by outcome, rows by position.

    Waves are bands of alternating shade with a label and a rule between them; a host the rollout
    waited on has a light bar before its dispatch (the wait). Up to ``NAMED_ROWS_MAX`` hosts each row
    is 16 px with the host's name; beyond, rows are 5 px without names (1,000 hosts: about 5,000 px,
    shown in a scrolling box, printed in full) — every bar carries a ``<title>`` tooltip either way.
    No ``style`` attributes: the page's CSP forbids inline styles, and presentation attributes
    (``fill``, ``stroke``) keep the colours when printed or saved on its own.
    """
    lines = report.lines
    named = len(lines) <= NAMED_ROWS_MAX
    row_h = 16 if named else 5
    label_w = 170 if named else 60
    plot_w = WIDTH - label_w - 36  # room for the last tick's label
    height = AXIS_H * 2 + max(1, len(lines)) * row_h
    span = max(1.0, (report.end - report.start).total_seconds())

    def x(t: dt.datetime) -> float:
        return label_w + plot_w * min(1.0, max(0.0, (t - report.start).total_seconds() / span))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" id="timeline" viewBox="0 0 {WIDTH} {height}"'
        f' width="{WIDTH}" height="{height}" role="img" font-family="sans-serif" font-size="11"'
        f' data-rows="{len(lines)}" data-row-height="{row_h}">',
        f"<title>Rollout {report.fleet['id']}: one bar per host from dispatch to finish</title>",
    ]
    # wave bands
    top = AXIS_H
    i = 0
    band = 0
    while i < len(lines):
        wave = lines[i].wave
        j = i
        while j < len(lines) and lines[j].wave == wave:
            j += 1
        y0, h = top + i * row_h, (j - i) * row_h
        shade = "#f6f8fa" if band % 2 == 0 else "#ffffff"
        out.append(
            f'<rect class="wave-band" data-wave="{wave}" x="0" y="{y0}" width="{WIDTH}" height="{h}" fill="{shade}"/>'
        )
        if i:
            out.append(f'<line class="wave-rule" x1="0" x2="{WIDTH}" y1="{y0}" y2="{y0}" stroke="#57606a"/>')
        if h >= 12:  # a thin band (one unnamed row) has no room for its label; its rule marks it
            out.append(f'<text class="wave-label" x="4" y="{y0 + 11}" fill="#57606a">wave {wave}</text>')
        band += 1
        i = j
    # time axis (top and bottom) with grid lines
    step = _tick_step(span)
    for k in range(int(span // step) + 1):
        s = k * step
        tx = label_w + plot_w * s / span
        out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{AXIS_H - 4}" y2="{height - AXIS_H + 4}" stroke="#d0d7de"/>')
        for ty in (AXIS_H - 8, height - 6):
            out.append(
                f'<text class="tick" x="{tx:.1f}" y="{ty}" text-anchor="middle" fill="#57606a">{_tick_label(s)}</text>'
            )
    # one row per host
    for n, h in enumerate(lines):
        y = top + n * row_h
        bar_y, bar_h = y + (3 if named else 1), row_h - (6 if named else 1)
        if named:
            label = escape(h.name if len(h.name) <= 22 else h.name[:21] + "…")  # clear of the wave label
            out.append(f'<text class="host-label" x="{label_w - 6}" y="{y + 12}" text-anchor="end">{label}</text>')
        waits = [t for t in (h.waiting_since, h.window_waiting_since) if t is not None]
        if waits:
            w_end = h.dispatched_at or h.finished_at or report.end
            wx0, wx1 = x(min(waits)), x(w_end)
            why = "offline" if h.window_waiting_since is None else f"window {h.window_name}"
            out.append(
                f'<rect class="wait" data-host="{escape(h.name)}" x="{wx0:.1f}" y="{bar_y}"'
                f' width="{max(1.0, wx1 - wx0):.1f}" height="{bar_h}" fill="{WAIT_COLOUR}">'
                f"<title>{escape(h.name)}: waited ({escape(why)})</title></rect>"
            )
        if h.dispatched_at is None or h.end is None:
            continue
        x0, x1 = x(h.dispatched_at), x(h.end)
        took = h.duration_s
        tip = f"{h.name}: {h.outcome}" + (f" in {took:g} s" if took is not None else "") + f", wave {h.wave}"
        if h.error:
            tip += f" — {h.error[:200]}"
        out.append(
            f'<rect class="bar bar-{h.outcome}" data-host="{escape(h.name)}" data-outcome="{h.outcome}"'
            f' data-wave="{h.wave}" x="{x0:.1f}" y="{bar_y}" width="{max(1.5, x1 - x0):.1f}" height="{bar_h}"'
            f' fill="{COLOURS[h.outcome]}"><title>{escape(tip)}</title></rect>'
        )
    out.append("</svg>")
    return Markup("".join(out))
