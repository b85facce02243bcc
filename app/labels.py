"""Host labels: ``{"key": "value"}`` pairs that rollouts and maintenance windows select hosts by.

The syntax follows Kubernetes labels, which operators already know: a key is 1 to 63 characters
of letters, digits, ``.``, ``_``, ``/`` and ``-``, starting and ending with a letter or digit; a
value is at most 63 characters of letters, digits, ``.``, ``_`` and ``-``, starting and ending
with a letter or digit (or empty). A host carries at most :data:`MAX_LABELS` labels. Keys and
values are case-sensitive. Every refusal here is ``Refusal(400, "invalid_labels", ...)``.

On the command line and in query strings a label is written ``key=value``; ``key-`` (in
``hosts label``) removes one.
"""

from __future__ import annotations

import re

from .errors import Refusal

MAX_LABELS = 32
MAX_KEY_LENGTH = 63
MAX_VALUE_LENGTH = 63
INVALID = "invalid_labels"

KEY_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
VALUE_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")

KEY_RULE = (
    f"a label key is 1 to {MAX_KEY_LENGTH} letters, digits, '.', '_', '/' or '-', "
    "starting and ending with a letter or digit"
)
VALUE_RULE = (
    f"a label value is at most {MAX_VALUE_LENGTH} letters, digits, '.', '_' or '-', "
    "starting and ending with a letter or digit"
)


def _shown(text: str, limit: int = 70) -> str:
    """``text`` quoted for a message, cut short if long (a refusal must not echo a megabyte)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_key(key) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        shown = _shown(key) if isinstance(key, str) else type(key).__name__
        raise Refusal(400, INVALID, f"bad label key {shown}: {KEY_RULE}")
    return key


def check_value(key: str, value) -> str:
    if not isinstance(value, str):
        raise Refusal(400, INVALID, f"label {key!r}: the value must be a string, not {type(value).__name__}")
    if not VALUE_RE.fullmatch(value):
        raise Refusal(400, INVALID, f"label {key!r}: bad value {_shown(value)}: {VALUE_RULE}")
    return value


def validate(labels, what: str = "labels") -> dict[str, str]:
    """``labels`` (a JSON object of strings) checked; a new dict, or 400 ``invalid_labels``."""
    if not isinstance(labels, dict):
        raise Refusal(400, INVALID, f"{what} must be a JSON object of key: value strings")
    if len(labels) > MAX_LABELS:
        raise Refusal(400, INVALID, f"{what} has {len(labels)} labels; at most {MAX_LABELS} are allowed")
    return {check_key(k): check_value(k, v) for k, v in labels.items()}


def parse_pair(text: str) -> tuple[str, str]:
    """``key=value`` as a checked pair; 400 ``invalid_labels`` otherwise."""
    if not isinstance(text, str) or "=" not in text:
        shown = _shown(text) if isinstance(text, str) else type(text).__name__
        raise Refusal(400, INVALID, f"bad label {shown}: write it key=value")
    key, value = text.split("=", 1)
    return check_key(key), check_value(key, value)


def parse_pairs(texts, what: str = "labels") -> dict[str, str]:
    """``["k=v", ...]`` as a checked dict; a key given twice with two values is refused."""
    out: dict[str, str] = {}
    for text in texts:
        key, value = parse_pair(text)
        if key in out and out[key] != value:
            raise Refusal(400, INVALID, f"label {key!r} is given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return validate(out, what)


def parse_text(text: str, what: str = "labels") -> dict[str, str]:
    """The form's field: ``key=value`` pairs separated by spaces, commas or new lines."""
    return parse_pairs([t for t in re.split(r"[\s,]+", text or "") if t], what)


def parse_edits(texts) -> tuple[dict[str, str], list[str]]:
    """The CLI's ``key=value`` (set) and ``key-`` (remove) arguments: ``(to set, to remove)``."""
    sets: list[str] = []
    removes: list[str] = []
    for text in texts:
        if "=" not in text and text.endswith("-"):
            removes.append(check_key(text[:-1]))
        else:
            sets.append(text)
    to_set = parse_pairs(sets)
    both = sorted(set(to_set) & set(removes))
    if both:
        raise Refusal(400, INVALID, f"label {both[0]!r} is both set and removed")
    return to_set, removes


def merged(current: dict, patch) -> dict[str, str]:
    """``current`` with a JSON merge patch (RFC 7396) applied: a null value removes the key."""
    if not isinstance(patch, dict):
        raise Refusal(400, INVALID, "labels must be a JSON object of key: value strings (null removes a key)")
    out = dict(current or {})
    for key, value in patch.items():
        check_key(key)
        if value is None:
            out.pop(key, None)
        else:
            out[key] = check_value(key, value)
    return validate(out, "the host's labels after this change")


def matches(have: dict | None, wanted: dict | None) -> bool:
    """True when ``have`` carries every ``key: value`` of ``wanted`` (an empty ``wanted`` matches all)."""
    have = have or {}
    return all(have.get(k) == v for k, v in (wanted or {}).items())


def narrowing(column, wanted: dict | None) -> list:
    """SQL conditions that keep rows of a JSON ``column`` carrying every label of ``wanted``.

    JSON path extraction is portable (``json_extract`` on SQLite, ``->>`` on PostgreSQL). The
    keys' syntax (no quote, no ``$``) keeps the path well formed. Callers still check
    :func:`matches` in Python: this narrows a query, it does not decide.
    """
    return [column[key].as_string() == value for key, value in (wanted or {}).items()]


def format_pairs(labels: dict | None) -> str:
    """``k=v k2=v2``, sorted by key: how pages, the CLI and messages show labels."""
    return " ".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))
