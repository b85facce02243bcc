"""Template filters for times, sizes and audit details."""

from __future__ import annotations

import datetime as dt

from ..timeutil import utcnow
from . import bp


@bp.app_template_filter("when")
def when(value: dt.datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("ago")
def ago(value: dt.datetime | None) -> str:
    if value is None:
        return "never"
    s = int((utcnow() - value).total_seconds())
    if s < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


@bp.app_template_filter("bytes")
def human_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _detail_text(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_detail_text(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_detail_text(v)}" for k, v in value.items()) or "none"
    return str(value)


@bp.app_template_filter("details")
def audit_details(details: dict | None) -> list[tuple[str, str]]:
    """An audit row's details as ``(key, text)`` pairs: lists joined with commas, never Python reprs."""
    return [(str(k), _detail_text(v)) for k, v in (details or {}).items()]


@bp.app_template_filter("took")
def took(span: tuple[dt.datetime | None, dt.datetime | None]) -> str:
    """How long from ``start`` to ``end`` (``(start, end)``), as ``42 s`` or ``3 min 12 s``."""
    start, end = span
    if start is None or end is None:
        return "—"
    s = max(0, int((end - start).total_seconds()))
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


@bp.app_template_filter("selector")
def selector_text(stored: dict | None) -> str:
    """A rollout's stored selector in a few words (``labels env=prod, os linux`` or ``every host``)."""
    from ..updates.selection import Selector

    return Selector.from_body(stored or {}).describe()


@bp.app_template_filter("secs")
def seconds(value: float | None) -> str:
    """A duration in seconds as ``4.2 s``, ``3 min 12 s`` or ``1 h 5 min``; ``—`` for none."""
    if value is None:
        return "—"
    if value < 60:
        return f"{value:.1f} s"
    s = int(round(value))
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"
