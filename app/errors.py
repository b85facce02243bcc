"""One error path: the :class:`Refusal` exception, one error body for both planes, one handler each.

A capability (hosts, dispatch, fleet) raises ``Refusal(status, code, message)`` when it will not do
what was asked. Views never catch it: the app's handler rolls the session back and answers in the
caller's format — the JSON envelope on ``/api`` (and for JSON clients), otherwise the page's own
refusal renderer (see :func:`renders_refusal`) or the error page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from flask import Flask, Response, current_app, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.http import HTTP_STATUS_CODES

from .extensions import db
from .htmx import is_htmx

log = logging.getLogger(__name__)

#: Default machine-readable codes for plain HTTP errors (views raise more specific ones).
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}

#: The ``WWW-Authenticate`` realm a 401 names (the agent plane passes its own).
REALM = "restic-manager"


class Refusal(Exception):
    """A refused operation: ``status`` and ``code`` are what the API answers, ``message`` for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    """The one error shape of both planes: ``{"error": {"code": ..., "message": ...}}``."""
    return {"error": {"code": code, "message": message}}


def error_bytes(code: str, message: str) -> bytes:
    """:func:`error_body` as JSON bytes, for WSGI code that runs outside Flask."""
    return json.dumps(error_body(code, message)).encode()


def error_response(status: int, code: str, message: str, realm: str = REALM) -> Response:
    """Return :func:`error_body` as a JSON response (with ``WWW-Authenticate`` on a 401)."""
    resp = jsonify(error_body(code, message))
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"'
    return resp


def wants_json() -> bool:
    """True for ``/api`` paths, the agent plane, and clients that prefer JSON over HTML."""
    if request.path == "/api" or request.path.startswith("/api/") or request.environ.get("rm.plane") == "agent":
        return True
    if is_htmx():
        return False
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def renders_refusal(render: Callable[[Refusal], object]):
    """Mark a page view: a :class:`Refusal` it raises is answered by ``render(refusal)``.

    Put it right under the route decorator. The handler has already rolled the session back.
    ``render`` may return None to leave the refusal to the error page (a missing object).
    """

    def mark(view):
        view.render_refusal = render
        return view

    return mark


def _code_for(e: HTTPException) -> str:
    if e.code == 400 and e.__class__.__name__ == "CSRFError":
        return "csrf_failed"
    return STATUS_CODES.get(e.code or 500, "error")


def _render(status: int, code: str, title: str, message: str) -> Response:
    if wants_json():
        return error_response(status, code, message)
    # An HTMX request swaps the answer into part of a page: give it a fragment, not a document.
    template = "errors/_error.html" if is_htmx() else "errors/error.html"
    return make_response(render_template(template, status=status, title=title, message=message), status)


def _render_http(e: HTTPException) -> Response:
    resp = _render(e.code or 500, _code_for(e), e.name, e.description or e.name)
    # Keep the headers werkzeug's exception carries: ``Allow`` on a 405 (RFC 9110), and the like.
    for name, value in e.get_headers():
        if name.lower() != "content-type":
            resp.headers.setdefault(name, value)
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(Refusal)
    def _refused(refusal: Refusal):
        db.session.rollback()
        view = current_app.view_functions.get(request.endpoint or "")
        render = getattr(view, "render_refusal", None)
        if render is not None and not wants_json():
            answer = render(refusal)
            if answer is not None:  # None: the renderer has no page for it (a 404), so the error page
                return answer
        return _render(refusal.status, refusal.code, HTTP_STATUS_CODES.get(refusal.status, "Error"), refusal.message)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if e.response is not None:  # abort(error_response(...)): already shaped
            return e.response
        if (e.code or 500) >= 500:
            db.session.rollback()
        return _render_http(e)

    @app.errorhandler(InternalServerError)
    def _internal_error(e: InternalServerError):
        # Whatever the failed request half-wrote must not leak into the next use of this session.
        db.session.rollback()
        original = getattr(e, "original_exception", None)
        if original is not None:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=original)
            e = InternalServerError()  # never show the exception text to the client
        return _render_http(e)
