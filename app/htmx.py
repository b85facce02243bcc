"""HTMX requests: detect them, and send the browser (not the swap target) somewhere else."""

from __future__ import annotations

from flask import Response, current_app, redirect, request


def is_htmx() -> bool:
    """True when htmx sent the request (it swaps the answer into part of a page)."""
    return request.headers.get("HX-Request") == "true"


def hx_redirect(location: str, status: int = 204) -> Response:
    """Tell htmx to navigate the whole page (a plain redirect would be swapped into the target)."""
    resp = current_app.response_class(status=status)
    resp.headers["HX-Redirect"] = location
    return resp


def redirect_or_hx(location: str) -> Response:
    """After a page POST: ``HX-Redirect`` for htmx, a 303 See Other for a plain form."""
    return hx_redirect(location) if is_htmx() else redirect(location, code=303)
