"""Security headers on every response of the admin plane."""

from __future__ import annotations

from flask import Flask, Response, request

# No inline script or style anywhere: HTMX is served from /static and configured through
# <meta> tags and hx-* attributes, so the policy can stay this strict.
CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def init_app(app: Flask) -> None:
    @app.after_request
    def _security_headers(resp: Response) -> Response:
        for name, value in HEADERS.items():
            resp.headers.setdefault(name, value)
        # Pages show one-time secrets (agent and API tokens): never let a cache keep them.
        if request.endpoint != "static":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp
