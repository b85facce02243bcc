"""The JSON API under /api: session or ``Authorization: Bearer <api token>``, one error shape.

Errors and refusals are answered by the app's handlers (``app/errors.py``), which give every
``/api`` path the JSON envelope.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, request
from flask_login import current_user
from flask_wtf.csrf import validate_csrf
from wtforms.validators import ValidationError

from ..errors import error_response
from ..extensions import login

bp = Blueprint("api", __name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@bp.before_request
def _authenticate_and_check_csrf():
    """Every API call needs a user; cookie-session mutations also need proof they are not cross-site.

    The API is exempt from Flask-WTF's form CSRF check because scripts use bearer tokens, which a
    browser never attaches on its own. A *cookie* session is attached automatically, so a mutating
    call on one must carry either the ``X-CSRFToken`` header (as the HTMX pages send) or a JSON
    body: a cross-site HTML form cannot send ``Content-Type: application/json``, and a script on
    another origin can only do so after a CORS preflight, which we never approve; the session
    cookie is also ``SameSite=Lax``, so it is not sent on cross-site POSTs at all.
    """
    if not current_user.is_authenticated:
        return login.unauthorized()
    if request.method not in MUTATING or g.get("api_token_prefix"):
        return None
    if not current_app.config.get("WTF_CSRF_ENABLED", True):
        return None
    header = request.headers.get("X-CSRFToken")
    if header:
        try:
            validate_csrf(header)
        except ValidationError as e:
            return error_response(400, "csrf_failed", f"the X-CSRFToken header is not valid: {e}")
        return None
    if request.mimetype == "application/json":
        return None
    return error_response(
        400, "csrf_required", "send the X-CSRFToken header or a JSON body (Content-Type: application/json)"
    )


from . import views, windows  # noqa: E402,F401  (routes register on bp)
