"""Property tests of the envelope parser (``agent.protocol``), and of the server's answer to garbage.

``decode`` takes anything a peer can send and returns an :class:`Envelope` or raises
:class:`ProtocolError` with one of the documented codes — never another exception. A valid
``encode`` round-trips through ``decode``; ``error_frame`` is decodable. Together the parser tests
run well over 10,000 examples (see ``EXAMPLES``); the last test sends a few hundred random frames
to the real server over a real WebSocket and checks that it answers each bad one with a valid
``error`` envelope and keeps the connection open.
"""

from __future__ import annotations

import json
import math

import pytest
import simple_websocket
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import protocol
from agent.protocol import (
    _MAX_LEN,
    MAX_CAPABILITIES,
    MAX_CAPABILITY_CHARS,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_INT,
    SCHEMAS,
    UPDATE_PHASES,
    Envelope,
    ProtocolError,
)
from agent.protocol import MAX_ID_CHARS as ECHO_MAX_CHARS
from tests.conftest import OLD_VERSION

pytestmark = pytest.mark.timeout(120)

#: Every code ``decode`` may raise (docs/protocol.md "Errors and limits", plus the size cap).
DECODE_CODES = frozenset(
    {"invalid_json", "invalid_envelope", "missing_field", "invalid_field", "unknown_type", "frame_too_large"}
)

#: Examples per parser property; the total is asserted to stay >= 10,000.
EXAMPLES = {
    "bytes": 3500,
    "text": 3000,
    "json": 1000,
    "near_valid": 1800,
    "round_trip": 1000,
    "error_frame": 700,
}

LIVE_CONFIG = {"AGENT_MSG_RATE": 1e6, "AGENT_MSG_BURST": 1e6}  # the socket test is not about rate limits


def fast(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_parser_properties_run_at_least_ten_thousand_examples():
    assert sum(EXAMPLES.values()) >= 10_000


# --- strategies --------------------------------------------------------------------------------

NO_SURROGATES = st.characters(blacklist_categories=("Cs",))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

_BY_TYPE = {
    str: st.text(st.characters(blacklist_characters="\x00"), max_size=24),
    int: st.integers(0, MAX_INT),
    float: st.floats(allow_nan=False),
    bool: st.booleans(),
    list: st.lists(st.text(st.characters(blacklist_characters="\x00"), max_size=8), max_size=4),
    dict: st.dictionaries(st.text(max_size=8), json_scalars, max_size=3),
    type(None): st.none(),
}


def value_for(type_: str, name: str, types: tuple[type, ...]):
    """A value the schema accepts for this field."""
    if (type_, name) == ("update.progress", "phase"):
        return st.sampled_from(UPDATE_PHASES)
    if type_ == "hello" and name == "last_update":
        return st.none() | st.fixed_dictionaries(
            {
                "job_id": st.text(max_size=36),
                "outcome": st.sampled_from(["swapped", "failed", "rolled_back"]),
                "error": st.none() | st.text(max_size=20),
            }
        )
    return st.one_of(*[_BY_TYPE[t] for t in types])


def valid_data(type_: str):
    schema = SCHEMAS[type_]
    required = {n: value_for(type_, n, t) for n, (t, req) in schema.items() if req}
    optional = {n: value_for(type_, n, t) for n, (t, req) in schema.items() if not req}
    return st.fixed_dictionaries(required, optional=optional)


known_types = st.sampled_from(sorted(SCHEMAS))
ids = st.text(max_size=40) | st.uuids().map(str)
valid_ids = st.text(st.characters(blacklist_characters="\x00"), max_size=40) | st.uuids().map(str)
VALID_DATA = {t: valid_data(t) for t in SCHEMAS}  # built once: strategy construction is not free
small_values = (
    json_scalars | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=6), json_scalars, max_size=2)
)
mutations = st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["drop", "retype", "null", "bool"])), max_size=3)


@st.composite
def valid_envelopes(draw):
    type_ = draw(known_types)
    return type_, draw(VALID_DATA[type_]), draw(valid_ids)


# The pieces of a near-valid envelope, built once (a strategy built inside a draw is built and
# validated again for every example: a third of this module's run time).
near_valid_types = known_types | st.text(max_size=12)
unknown_type_data = st.dictionaries(st.text(max_size=8), small_values, max_size=3)
booleans = st.booleans()
extra_data_fields = st.dictionaries(st.text(max_size=10), small_values, max_size=2)
envelope_edits = st.lists(st.tuples(st.sampled_from(["type", "id", "data"]), booleans), max_size=2)
extra_envelope_keys = st.dictionaries(st.sampled_from(["extra", "ref", "v"]), small_values, max_size=1)


@st.composite
def near_valid_envelopes(draw):
    """A valid envelope of a random type, then a few fields dropped, retyped or added."""
    type_ = draw(near_valid_types)
    schema = sorted(SCHEMAS.get(type_, {}))
    data = dict(draw(VALID_DATA[type_])) if type_ in SCHEMAS else draw(unknown_type_data)
    for index, op in draw(mutations) if schema else ():
        name = schema[index % len(schema)]
        if op == "drop":
            data.pop(name, None)
        elif op == "retype":
            data[name] = draw(small_values)
        elif op == "null":
            data[name] = None
        else:
            data[name] = draw(booleans)
    data.update(draw(extra_data_fields))
    env: dict = {"type": type_, "id": draw(ids), "data": data}
    for key, drop in draw(envelope_edits):
        if drop:
            env.pop(key, None)
        else:
            env[key] = draw(small_values)
    env.update(draw(extra_envelope_keys))
    return env


def echo_bombs():
    """An unknown type or id of characters JSON sends raw but ``repr`` escapes: an error reply that
    quotes them back grows several times the size of the frame that caused it."""
    chars = st.sampled_from(["\x7f", "\\", "'", "é", "\u2028"])
    big = st.builds(lambda c, n: c * n, chars, st.integers(1_000, 9_000))
    return st.one_of(
        big.map(lambda t: json.dumps({"type": t, "id": "x", "data": {}}, ensure_ascii=False)),
        st.tuples(big, big).map(lambda p: json.dumps({"type": "no-such-" + p[0], "id": p[1]}, ensure_ascii=False)),
        big.map(lambda i: json.dumps({"type": "hello", "id": i, "data": {}}, ensure_ascii=False)),
        big.map(lambda i: json.dumps({"type": "ping", "id": i}, ensure_ascii=False)),
    )


# --- the reference: what the documented contract says about an envelope -----------------------


def _type_ok(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def field_problem(type_: str, data: dict, name: str) -> str | None:
    """Why ``data.name`` is wrong for ``type_`` per the schema (None if it is fine)."""
    types, required = SCHEMAS[type_][name]
    if name not in data:
        return "missing_field" if required else None
    value = data[name]
    if not _type_ok(value, types):
        return "invalid_field"
    if isinstance(value, str) and ("\x00" in value or len(value) > _MAX_LEN.get((type_, name), len(value))):
        return "invalid_field"
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_INT:
        return "invalid_field"
    if (type_, name) == ("update.progress", "phase") and value not in UPDATE_PHASES:
        return "invalid_field"
    if (type_, name) == ("hello", "capabilities") and (
        len(value) > MAX_CAPABILITIES
        or not all(isinstance(c, str) and "\x00" not in c and len(c) <= MAX_CAPABILITY_CHARS for c in value)
    ):
        return "invalid_field"
    return None


def reference_valid(obj) -> bool:
    if not isinstance(obj, dict):
        return False
    type_, id_, data = obj.get("type"), obj.get("id", ""), obj.get("data", {})
    data = {} if data is None else data
    if not isinstance(type_, str) or type_ not in SCHEMAS or not isinstance(id_, str) or not isinstance(data, dict):
        return False
    if len(id_) > MAX_ID_CHARS or "\x00" in id_:
        return False
    return all(field_problem(type_, data, n) is None for n in SCHEMAS[type_])


def decode_outcome(frame) -> Envelope | ProtocolError:
    """Run ``decode``; fail the test on any exception that is not a documented ProtocolError."""
    try:
        return protocol.decode(frame)
    except ProtocolError as e:
        assert e.code in DECODE_CODES, f"undocumented code {e.code!r}"
        assert isinstance(e.message, str) and e.message
        assert e.ref is None or isinstance(e.ref, str)
        return e


def check_against_reference(obj, outcome) -> None:
    if isinstance(outcome, Envelope):
        assert reference_valid(obj), f"decode accepted an invalid envelope: {obj!r}"
        assert outcome.type == obj["type"]
        assert json.dumps(outcome.data, sort_keys=True) == json.dumps(obj.get("data") or {}, sort_keys=True)
        assert outcome.id == obj.get("id", "")
        return
    assert not reference_valid(obj), f"decode refused a valid envelope ({outcome.code}: {outcome.message})"
    if outcome.field and outcome.field.startswith("data."):
        name = outcome.field[len("data.") :]
        assert name in outcome.message, "the message names the field"
        assert field_problem(obj["type"], obj.get("data") or {}, name) == outcome.code, outcome.message
    if outcome.code == "unknown_type":
        assert obj["type"] not in SCHEMAS


# --- parser properties -------------------------------------------------------------------------


@fast(EXAMPLES["bytes"])
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xff\xfe")
@example(b"[" * 100_000)
@example(b" " * (MAX_FRAME_BYTES + 1))
@example(json.dumps({"type": "heartbeat"}).encode())
def test_any_bytes_give_an_envelope_or_a_typed_error(frame):
    outcome = decode_outcome(frame)
    try:
        obj = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        assert isinstance(outcome, ProtocolError)
        return
    if len(frame) <= MAX_FRAME_BYTES:
        check_against_reference(obj, outcome)


nested = st.builds(
    lambda open_, n: open_ * n + ("]" if open_ == "[" else "}") * n,
    st.sampled_from(["[", '{"a":']),
    st.integers(1, 50_000),
)


@fast(EXAMPLES["text"])
@given(st.text(max_size=512) | nested | st.builds(lambda n: "0" * n, st.integers(4_000, 5_000)))
@example("")
@example("null")
@example('"hello"')
@example("NaN")
@example("1" * 5000)
@example("\ud800")
@example('{"type": "ping", "data": null}')
@example("x" * (MAX_FRAME_BYTES + 1))
def test_any_text_gives_an_envelope_or_a_typed_error(frame):
    outcome = decode_outcome(frame)
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        assert isinstance(outcome, ProtocolError) and outcome.code in ("invalid_json", "frame_too_large")
        return
    if len(frame) <= MAX_FRAME_BYTES:
        check_against_reference(obj, outcome)


@fast(EXAMPLES["json"])
@given(json_values)
def test_any_json_value_gives_an_envelope_or_a_typed_error(value):
    frame = json.dumps(value)
    outcome = decode_outcome(frame)
    check_against_reference(value, outcome)
    if not isinstance(value, dict):
        assert outcome.code == "invalid_envelope"


@fast(EXAMPLES["near_valid"])
@given(near_valid_envelopes(), st.booleans())
def test_near_valid_envelopes_are_accepted_exactly_when_they_match_the_schema(env, as_bytes):
    frame = json.dumps(env)
    outcome = decode_outcome(frame.encode() if as_bytes else frame)
    check_against_reference(env, outcome)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@fast(EXAMPLES["round_trip"])
@given(valid_envelopes(), st.booleans())
def test_a_valid_encode_round_trips_through_decode(env, as_bytes):
    type_, data, id_ = env
    frame = protocol.encode(type_, data, id_ or None)
    got = protocol.decode(frame.encode() if as_bytes else frame)
    assert got.type == type_
    assert got.id == (id_ or json.loads(frame)["id"])
    assert got.data.keys() == data.keys() and all(_same(got.data[k], data[k]) for k in data)


@fast(EXAMPLES["error_frame"])
@given(
    st.sampled_from(sorted(DECODE_CODES | {"expected_hello", "unexpected_type", "rate_limited"}))
    | st.text(max_size=30),
    st.text(max_size=1000),
    st.none() | st.text(max_size=100),
)
def test_error_frame_is_always_decodable(code, message, ref):
    env = protocol.decode(protocol.error_frame(code, message, ref))
    assert env.type == "error"

    def shown(text):  # NUL is spelled out: the server stores error text, and PostgreSQL refuses NUL
        return None if text is None else text.replace("\x00", "\\x00")

    assert env.data == {"code": shown(code), "message": shown(message), "ref": shown(ref)}


def test_error_frame_of_a_message_longer_than_a_frame_is_decodable():
    protocol.decode(protocol.error_frame("unknown_type", "x" * (MAX_FRAME_BYTES + 1)))


# --- garbage over a real socket ----------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_ws(module_app, module_live):
    """One authenticated agent connection, past its hello, shared by every example."""
    from tests.conftest import Cast

    cast = Cast()
    ws = simple_websocket.Client.connect(
        module_live.agent_ws_url + "/ws/agent", headers={"Authorization": f"Bearer {cast.host_behind_token}"}
    )
    ws.send(
        protocol.encode(
            "hello",
            {
                "agent_version": OLD_VERSION,
                "os": "linux",
                "arch": "x86_64",
                "hostname": "fuzz",
                "python": "3.11",
                "capabilities": ["update"],
                "boot_id": "fuzz-boot",
                "last_update": None,
            },
        )
    )
    assert protocol.decode(ws.receive(timeout=5)).type == "welcome"
    yield ws
    try:
        ws.close()
    except simple_websocket.ConnectionClosed:
        pass  # the server already closed it (the test has failed and says why)


def _echo(text: str | None) -> str | None:
    """What an error reply quotes of a frame's id: bounded, with NUL spelled out."""
    return None if text is None else text[:ECHO_MAX_CHARS].replace("\x00", "\\x00")


def _expected_replies(frame) -> list[tuple[str, str | None, str | None]]:
    """What the server answers ``frame`` after the hello: (type, error code or None, ref).

    A reply quotes at most ``ECHO_MAX_CHARS`` of the frame's id (see agent/protocol.py error_frame).
    """
    try:
        env = protocol.decode(frame)
    except ProtocolError as e:
        return [("error", e.code, _echo(e.ref))]
    if env.type == "ping":
        return [("pong", None, _echo(env.id))]
    if env.type in ("hello", "welcome", "command.update"):
        return [("error", "unexpected_type", _echo(env.id))]
    return []  # heartbeat, pong, error, update.progress, update.result: handled without a reply


_sync_ids: set[str] = set()

socket_frames = st.one_of(
    st.binary(max_size=300),
    st.text(NO_SURROGATES, max_size=300),
    json_values.map(json.dumps),
    near_valid_envelopes().map(json.dumps),
    # Reports whose byte counts may lie outside what the database can store (the protocol refuses them).
    st.builds(
        lambda j, d, t: json.dumps(
            {
                "type": "update.progress",
                "id": "p",
                "data": {"job_id": j, "phase": "downloading", "bytes_done": d, "bytes_total": t},
            }
        ),
        st.text(NO_SURROGATES, max_size=40),
        st.integers(),
        st.integers(),
    ),
    echo_bombs(),
).filter(lambda f: len(f if isinstance(f, bytes) else f.encode()) <= MAX_FRAME_BYTES - 1024)


# A failing echo bomb is a big example; let hypothesis print it instead of erroring on its size.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(socket_frames)
def test_the_server_answers_random_frames_with_error_envelopes_and_keeps_the_connection(agent_ws, frame):
    agent_ws.send(frame)
    sync = protocol.new_id()
    _sync_ids.add(sync)
    agent_ws.send(protocol.encode("ping", {}, sync))
    replies = []
    while True:
        raw = agent_ws.receive(timeout=5)
        assert raw is not None, f"no answer from the server; connected={agent_ws.connected}"
        size = len(raw if isinstance(raw, bytes) else raw.encode())
        assert size <= MAX_FRAME_BYTES, f"the server sent a {size}-byte reply its peer would refuse"
        env = protocol.decode(raw)  # every reply is itself a valid envelope
        if env.type == "pong" and env.data["ref"] in _sync_ids:
            if env.data["ref"] == sync:
                break
            continue  # left unread by an earlier example that failed half way
        replies.append(env)
    got = [(e.type, e.data.get("code"), e.data.get("ref")) for e in replies]
    assert got == _expected_replies(frame)
    for e in replies:
        if e.type == "error":
            assert e.data["message"]
    assert agent_ws.connected
