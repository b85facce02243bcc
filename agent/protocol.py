"""The agent-plane wire protocol, defined once and imported by the server.

Every frame is one JSON text envelope: ``{"type": "...", "id": "<uuid>", "data": {...}}``.
:func:`decode` turns any input into an :class:`Envelope` or raises :class:`ProtocolError`
with a machine-readable ``code`` and, where one is to blame, the ``field`` — it never lets
another exception escape, so neither side crashes on a bad frame.

This module is stdlib only: the agent must not depend on the server.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

#: Largest frame either side accepts; larger frames close the connection with 1009.
MAX_FRAME_BYTES = 64 * 1024

#: WebSocket close codes used on the agent link.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down (a restart): reconnect soon (agent.transport.Backoff)
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_REPLACED = 4000  # a newer connection for the same host took over
CLOSE_REVOKED = 4001  # the host's token was revoked or the host deleted
CLOSE_IDLE = 4002  # no frame within the heartbeat timeout

#: A server that closes with 1001 may name, in the close reason, the window over which its agents
#: should spread their return (``reconnect within 12.5 s``): it knows how many it held and how fast
#: it welcomes them. Old agents ignore the text; an agent bounds what it honours.
MAX_RECONNECT_SPREAD_S = 60.0
_SPREAD = re.compile(r"reconnect within (\d{1,4}(?:\.\d{1,3})?) s")


def going_away_reason(spread_s: float | None) -> str:
    """The 1001 close reason, naming the reconnect window when there is one (under 123 bytes)."""
    if spread_s is None:
        return "server shutting down"
    return f"server shutting down; reconnect within {min(spread_s, MAX_RECONNECT_SPREAD_S):.1f} s"


def reconnect_spread(reason: str | None) -> float | None:
    """The window a 1001 close reason names (see :func:`going_away_reason`), or None; bounded to
    [0, MAX_RECONNECT_SPREAD_S] whatever the text says."""
    m = _SPREAD.search(reason or "")
    return None if m is None else min(float(m.group(1)), MAX_RECONNECT_SPREAD_S)


UPDATE_PHASES = ("downloading", "verifying", "staging", "restarting")

# Field specs are written ``name:type`` (``name?:type`` when the field may be absent), where type
# is one of _TYPES or several joined by ``|``. SCHEMAS holds them parsed: name -> (accepted Python
# types, required). bool is excluded from int on purpose (see validate).
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "num": (int, float),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "null": (type(None),),
}


def _fields(*specs: str) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Parse ``"name:type other?:type|null"`` field specs into a schema."""
    schema = {}
    for spec in " ".join(specs).split():
        name, _, types = spec.partition(":")
        schema[name.rstrip("?")] = (sum((_TYPES[t] for t in types.split("|")), ()), not name.endswith("?"))
    return schema


SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": _fields(
        "agent_version:str os:str arch:str hostname:str python:str capabilities:list boot_id:str",
        "last_update:dict|null platform?:str update_unavailable?:str|null",
    ),
    # host_id: the host the token belongs to; a command.update must name it (absent from old servers)
    "welcome": _fields("server_version:str heartbeat_s:num host_id?:int"),
    "heartbeat": {},
    "ping": {},
    "pong": _fields("ref:str"),
    "command.update": _fields(
        "job_id:str version:str url:str sha256:str size:int",
        "host_id?:int signature?:str|null platform?:str allow_downgrade?:bool",
    ),
    "update.progress": _fields("job_id:str phase:str bytes_done:int bytes_total:int"),
    "update.result": _fields("job_id:str ok:bool error:str"),
    "error": _fields("code:str message:str ref?:str|null"),
}

KNOWN_TYPES = frozenset(SCHEMAS)

#: Longest envelope id accepted; real ids are UUIDs. Bounds what an error or pong echoes back.
MAX_ID_CHARS = 256
#: Longest ``error`` message sent: a reply must never outgrow the frame limit its peer enforces.
MAX_ERROR_MESSAGE_CHARS = 1024
#: Integers are counts and sizes: non-negative and storable as a 64-bit BIGINT.
MAX_INT = 2**63 - 1
#: What the server stores from a hello fits its columns; longer values are refused, not cut.
_MAX_LEN = {
    ("hello", "agent_version"): 128,
    ("hello", "os"): 64,
    ("hello", "arch"): 64,
    ("hello", "hostname"): 255,
    ("hello", "python"): 32,
    ("hello", "boot_id"): 64,
    ("hello", "platform"): 64,
    ("hello", "update_unavailable"): 64,
}
#: Why an agent leaves ``update`` out of its capabilities (the hello's ``update_unavailable``).
#: A server shows an unknown value as it is: a newer agent may know more reasons.
UPDATE_UNAVAILABLE_NO_KEY = "no_release_key"
UPDATE_UNAVAILABLE_NOT_REPLACEABLE = "not_replaceable"
MAX_CAPABILITIES = 32
MAX_CAPABILITY_CHARS = 64

# Extra value checks beyond the type, keyed by (envelope type, field).
_ENUMS = {
    ("update.progress", "phase"): UPDATE_PHASES,
}


class ProtocolError(Exception):
    """A frame that is not a valid envelope; ``code`` is what the peer is told."""

    def __init__(self, code: str, message: str, field: str | None = None, ref: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.ref = ref


@dataclass(frozen=True)
class Envelope:
    type: str
    data: dict = field(default_factory=dict)
    id: str = ""


def new_id() -> str:
    return str(uuid.uuid4())


def encode(type_: str, data: dict | None = None, id_: str | None = None) -> str:
    """Serialize one envelope; the type must be known and the data must validate."""
    data = dict(data or {})
    env = Envelope(type_, data, id_ or new_id())
    validate(env)
    return json.dumps({"type": env.type, "id": env.id, "data": env.data}, separators=(",", ":"))


def error_frame(code: str, message: str, ref: str | None = None) -> str:
    """An ``error`` envelope, bounded in size whatever the offending frame held."""
    if ref is not None:
        ref = ref[:MAX_ID_CHARS].replace("\x00", "\\x00")
    message = message[:MAX_ERROR_MESSAGE_CHARS].replace("\x00", "\\x00")
    return encode("error", {"code": code.replace("\x00", "\\x00"), "message": message, "ref": ref})


def decode(frame: str | bytes) -> Envelope:
    """Parse and validate one frame; raise :class:`ProtocolError` on anything else."""
    if isinstance(frame, (bytes, bytearray)):
        if len(frame) > MAX_FRAME_BYTES:
            raise ProtocolError("frame_too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
        try:
            frame = bytes(frame).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid_json", "frame is not UTF-8 text") from None
    if not isinstance(frame, str):
        raise ProtocolError("invalid_json", "frame is not text")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_envelope", "envelope must be a JSON object")
    type_ = obj.get("type")
    if not isinstance(type_, str) or not type_:
        raise ProtocolError("missing_field", "envelope field 'type' is missing", field="type")
    id_ = obj.get("id", "")
    if not isinstance(id_, str):
        raise ProtocolError("invalid_field", "envelope field 'id' must be a string", field="id")
    if len(id_) > MAX_ID_CHARS or "\x00" in id_:
        raise ProtocolError(
            "invalid_field", f"envelope field 'id' must be at most {MAX_ID_CHARS} characters, without NUL", field="id"
        )
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("invalid_field", "envelope field 'data' must be an object", field="data", ref=id_)
    env = Envelope(type_, data, id_)
    validate(env)
    return env


def validate(env: Envelope) -> None:
    schema = SCHEMAS.get(env.type)
    if schema is None:
        raise ProtocolError("unknown_type", f"unknown envelope type {env.type!r}", field="type", ref=env.id)
    for name, (types, required) in schema.items():
        if name not in env.data:
            if required:
                raise ProtocolError(
                    "missing_field", f"{env.type}: field 'data.{name}' is missing", field=f"data.{name}", ref=env.id
                )
            continue
        value = env.data[name]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            want = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ProtocolError(
                "invalid_field", f"{env.type}: field 'data.{name}' must be {want}", field=f"data.{name}", ref=env.id
            )
        problem = _value_problem(env.type, name, value)
        if problem:
            raise ProtocolError(
                "invalid_field", f"{env.type}: field 'data.{name}' {problem}", field=f"data.{name}", ref=env.id
            )
        allowed = _ENUMS.get((env.type, name))
        if allowed and value not in allowed:
            raise ProtocolError(
                "invalid_field",
                f"{env.type}: field 'data.{name}' must be one of {', '.join(allowed)}",
                field=f"data.{name}",
                ref=env.id,
            )
    caps = env.data["capabilities"] if env.type == "hello" else []
    if not all(isinstance(c, str) and "\x00" not in c and len(c) <= MAX_CAPABILITY_CHARS for c in caps) or (
        len(caps) > MAX_CAPABILITIES
    ):
        raise ProtocolError(
            "invalid_field",
            f"hello: 'data.capabilities' must be a list of at most {MAX_CAPABILITIES} strings "
            f"of at most {MAX_CAPABILITY_CHARS} characters",
            field="data.capabilities",
            ref=env.id,
        )


def _value_problem(type_: str, name: str, value) -> str | None:
    """Say what is wrong with a well-typed value that still cannot be used, or None."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters"
        limit = _MAX_LEN.get((type_, name))
        if limit is not None and len(value) > limit:
            return f"is longer than {limit} characters"
    elif isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_INT:
        return "must be a whole number from 0 to 2^63-1"
    return None
