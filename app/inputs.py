"""What a request may carry: a bounded body, bounded JSON nesting, ids the database can hold, forms
of text fields only. Every refusal here is a 4xx in the caller's format, never a 500.

- The body limit (``MAX_BODY_KIB``) is Flask's ``MAX_CONTENT_LENGTH``; the admin plane's waitress
  refuses larger bodies before buffering them, and hands the refusal back to the app to word it
  (see ``app/serve.py``).
- JSON nested deeper than :data:`MAX_JSON_DEPTH` is invalid JSON (400), not a ``RecursionError``.
- ``<int:...>`` URL parts and integer query and body values stop at :data:`MAX_ID`: a larger id
  is no id at all (404 in a path, 400 in a query or body), not an ``OverflowError`` (SQLite, from
  2^63) or a ``NumericValueOutOfRange`` (PostgreSQL, from 2^31).
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from flask_wtf import FlaskForm
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import IntegerConverter

#: The largest id: id columns are ``Integer``, 32 bits on PostgreSQL (SQLite's hold 64).
MAX_ID = 2**31 - 1
#: The deepest JSON a request body may nest; the API's bodies nest two levels.
MAX_JSON_DEPTH = 32
#: Set on the WSGI environ by a server that refused the body before the app saw it.
BODY_TOO_LARGE_KEY = "rm.body_too_large"


def _digits_at_most(limit: str) -> str:
    """A regex for the digit strings as long as ``limit`` that are not greater than it."""
    head, rest = int(limit[0]), limit[1:]
    tail = rf"\d{{{len(rest)}}}" if rest else ""
    alternatives = [f"[0-{head - 1}]{tail}"] if head else []
    alternatives.append(limit[0] + (_digits_at_most(rest) if rest else ""))
    return "(?:" + "|".join(alternatives) + ")"


class BoundedIntConverter(IntegerConverter):
    """``<int:...>``: a non-negative integer of at most :data:`MAX_ID`.

    The bound is in the regex, not only in ``to_python``: werkzeug answers a path whose converter
    refuses a value with 405 when another method's rule has the same path, so a larger number
    must not match the path at all (404 for every method).
    """

    regex = rf"\d{{1,{len(str(MAX_ID)) - 1}}}|{_digits_at_most(str(MAX_ID))}"

    def __init__(self, map, fixed_digits=0, min=None, max=None, signed=False):  # noqa: A002 - werkzeug's names
        super().__init__(map, fixed_digits, min, MAX_ID if max is None else max, signed)


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing documents nested deeper than :data:`MAX_JSON_DEPTH` with ``ValueError``
    (``get_json`` turns that into 400, or ``None`` when silent) instead of raising ``RecursionError``."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        opening = s.count(b"[") + s.count(b"{") if isinstance(s, bytes) else s.count("[") + s.count("{")
        if opening <= MAX_JSON_DEPTH:  # the common case: cannot nest too deep, parse as is
            return super().loads(s, **kwargs)
        try:
            value = super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        if json_depth(value) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        return value


def json_depth(value: Any) -> int:
    """How deep containers nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


_INT = re.compile(r"-?[0-9]{1,19}")


def bounded_int(raw: str | None, lo: int = 0, hi: int = MAX_ID) -> int | None:
    """``raw`` as an integer in ``[lo, hi]``, or ``None`` when it is not one (a bad query value).

    Plain ASCII digits only: ``int()`` would also take ``"1_000"``, ``" 7 "``, other scripts' digits
    and numbers too long for any column.
    """
    if raw is None or not _INT.fullmatch(raw):
        return None
    n = int(raw)
    return n if lo <= n <= hi else None


def is_id(value: Any) -> bool:
    """True for a JSON integer (not a bool) that can be an id: 1 to :data:`MAX_ID`."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control_characters(text: str) -> bool:
    """True if ``text`` holds a C0 control character or DEL (NUL is one PostgreSQL cannot store)."""
    return _CONTROL.search(text) is not None


_FROM_REQUEST = object()
_SUBMIT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class TextForm(FlaskForm):
    """The base of every form: fields read only the form's text parts.

    Flask-WTF would also fill fields from file parts (a multipart login with the password sent as
    a file gave the password field a ``FileStorage``: 500) or from a JSON body (any JSON value). No
    form here takes a file or JSON, so a field holds a string or nothing: a form error, not a 500.
    """

    def __init__(self, formdata=_FROM_REQUEST, **kwargs):
        if formdata is _FROM_REQUEST:
            formdata = request.form if request.method in _SUBMIT_METHODS and request.form else None
        super().__init__(formdata=formdata, **kwargs)

    def validate(self, extra_validators=None) -> bool:
        """Also refuse NUL in any field: no field needs it, and PostgreSQL cannot store or compare it."""
        ok = super().validate(extra_validators)
        for field in self:
            if isinstance(field.data, str) and "\x00" in field.data:
                field.errors = [*field.errors, "Must not contain NUL characters."]
                ok = False
        return ok


def init_app(app: Flask) -> None:
    """Install the converter and JSON provider (before any blueprint), and the body limit check."""
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_KIB"] * 1024
    app.url_map.converters["int"] = BoundedIntConverter
    app.json = BoundedJSONProvider(app)

    @app.before_request
    def _refuse_large_bodies():
        # Content-Length says so before a byte is read; chunked bodies stop at the limit as read.
        if request.environ.get(BODY_TOO_LARGE_KEY) or (request.content_length or 0) > app.config["MAX_CONTENT_LENGTH"]:
            raise RequestEntityTooLarge(f"the request body is larger than {app.config['MAX_BODY_KIB']} KiB")
