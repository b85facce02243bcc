"""One error shape for the API, an HTML page for browsers, and a clean rollback on 500."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from .extensions import db

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


def error_response(status: int, code: str, message: str) -> Response:
    """Return the API's one error shape: ``{"error": {"code": ..., "message": ...}}``."""
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="restic-manager"'
    return resp


def wants_json() -> bool:
    """True for ``/api`` paths and for clients that prefer JSON over HTML."""
    if request.path == "/api" or request.path.startswith("/api/"):
        return True
    if request.headers.get("HX-Request"):
        return False
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def _code_for(e: HTTPException) -> str:
    if e.code == 400 and e.__class__.__name__ == "CSRFError":
        return "csrf_failed"
    return STATUS_CODES.get(e.code or 500, "error")


def _render(e: HTTPException):
    status = e.code or 500
    message = e.description or e.name
    if wants_json():
        return error_response(status, _code_for(e), message)
    # An HTMX request swaps the answer into part of a page: give it a fragment, not a document.
    template = "errors/_error.html" if request.headers.get("HX-Request") else "errors/error.html"
    return render_template(template, status=status, title=e.name, message=message), status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if e.response is not None:  # abort(error_response(...)): already shaped
            return e.response
        if (e.code or 500) >= 500:
            db.session.rollback()
        return _render(e)

    @app.errorhandler(InternalServerError)
    def _internal_error(e: InternalServerError):
        # Whatever the failed request half-wrote must not leak into the next use of this session.
        db.session.rollback()
        original = getattr(e, "original_exception", None)
        if original is not None:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=original)
            e = InternalServerError()  # never show the exception text to the client
        return _render(e)
