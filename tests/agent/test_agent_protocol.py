"""The wire protocol's decode/encode edge cases, as the agent relies on them."""

import json

import pytest

from agent import protocol
from agent.protocol import ProtocolError, decode, encode


def frame(type_, data=None, id_="i-1"):
    return json.dumps({"type": type_, "id": id_, "data": data if data is not None else {}})


def test_it_round_trips_a_valid_envelope():
    text = encode("pong", {"ref": "abc"}, "id-1")
    env = decode(text)
    assert (env.type, env.id, env.data) == ("pong", "id-1", {"ref": "abc"})


def test_it_accepts_bytes_frames():
    assert decode(frame("heartbeat").encode()).type == "heartbeat"


@pytest.mark.parametrize("bad", ["not json", "{", "", "\ud800", b"\xff\xfe"])
def test_it_rejects_invalid_json_with_a_typed_error(bad):
    with pytest.raises(ProtocolError) as exc:
        decode(bad)
    assert exc.value.code == "invalid_json"


@pytest.mark.parametrize("bad", ["[]", "1", '"x"', "null"])
def test_it_rejects_json_that_is_not_an_object(bad):
    with pytest.raises(ProtocolError) as exc:
        decode(bad)
    assert exc.value.code == "invalid_envelope"


def test_it_names_a_missing_type():
    with pytest.raises(ProtocolError) as exc:
        decode('{"id": "x", "data": {}}')
    assert (exc.value.code, exc.value.field) == ("missing_field", "type")


def test_it_answers_unknown_types_with_their_id():
    with pytest.raises(ProtocolError) as exc:
        decode(frame("reboot", id_="r-1"))
    assert (exc.value.code, exc.value.ref) == ("unknown_type", "r-1")


def test_it_names_the_missing_field():
    with pytest.raises(ProtocolError) as exc:
        decode(frame("welcome", {"server_version": "1"}))
    assert exc.value.code == "missing_field"
    assert exc.value.field == "data.heartbeat_s"
    assert "heartbeat_s" in exc.value.message


@pytest.mark.parametrize(
    "data, field",
    [
        ({"server_version": 1, "heartbeat_s": 5}, "data.server_version"),
        ({"server_version": "1", "heartbeat_s": "5"}, "data.heartbeat_s"),
        ({"server_version": "1", "heartbeat_s": True}, "data.heartbeat_s"),
    ],
)
def test_it_rejects_wrong_types(data, field):
    with pytest.raises(ProtocolError) as exc:
        decode(frame("welcome", data))
    assert (exc.value.code, exc.value.field) == ("invalid_field", field)


def test_it_does_not_take_a_bool_for_an_int():
    data = {"job_id": "j", "version": "2", "url": "/x", "sha256": "0" * 64, "size": True}
    with pytest.raises(ProtocolError) as exc:
        decode(frame("command.update", data))
    assert exc.value.field == "data.size"


def test_it_rejects_an_unknown_progress_phase():
    data = {"job_id": "j", "phase": "dancing", "bytes_done": 0, "bytes_total": 1}
    with pytest.raises(ProtocolError) as exc:
        decode(frame("update.progress", data))
    assert exc.value.field == "data.phase"


def test_it_rejects_non_string_capabilities():
    data = {
        "agent_version": "1",
        "os": "linux",
        "arch": "x",
        "hostname": "h",
        "python": "3.11",
        "capabilities": ["update", 3],
        "boot_id": "b",
        "last_update": None,
    }
    with pytest.raises(ProtocolError) as exc:
        decode(frame("hello", data))
    assert exc.value.field == "data.capabilities"


def test_it_rejects_oversized_frames():
    with pytest.raises(ProtocolError) as exc:
        decode("x" * (protocol.MAX_FRAME_BYTES + 1))
    assert exc.value.code == "frame_too_large"


def test_it_rejects_a_non_object_data():
    with pytest.raises(ProtocolError) as exc:
        decode('{"type": "heartbeat", "id": "x", "data": [1]}')
    assert exc.value.field == "data"


def test_encode_refuses_invalid_data():
    with pytest.raises(ProtocolError):
        encode("pong", {})


def test_error_frame_is_a_valid_envelope():
    env = decode(protocol.error_frame("invalid_json", "frame is not valid JSON", ref=None))
    assert env.type == "error" and env.data["code"] == "invalid_json"


def test_field_specs_parse_into_types_and_required_flags():
    hello, update = protocol.SCHEMAS["hello"], protocol.SCHEMAS["command.update"]
    assert hello["agent_version"] == ((str,), True)
    assert hello["last_update"] == ((dict, type(None)), True)  # present, but may be null
    assert hello["platform"] == ((str,), False)
    assert update["signature"] == ((str, type(None)), False)
    assert update["allow_downgrade"] == ((bool,), False)
    assert protocol.SCHEMAS["welcome"]["heartbeat_s"] == ((int, float), True)
    assert list(protocol.SCHEMAS["update.progress"]) == ["job_id", "phase", "bytes_done", "bytes_total"]


# -- the 1001 close reason may name the window the fleet should spread its return over


def test_a_going_away_reason_names_its_window_and_reads_back():
    reason = protocol.going_away_reason(14.25)
    assert reason == "server shutting down; reconnect within 14.2 s"
    assert protocol.reconnect_spread(reason) == 14.2
    assert len(reason.encode()) <= 123  # what a close frame's reason may hold


def test_a_going_away_reason_without_a_window_names_none():
    assert protocol.going_away_reason(None) == "server shutting down"
    assert protocol.reconnect_spread("server shutting down") is None


@pytest.mark.parametrize(
    "reason, expected",
    [
        (None, None),
        ("", None),
        ("reconnect within -5 s", None),  # no sign accepted: nothing named
        ("reconnect within abc s", None),
        ("reconnect within 1e9 s", None),
        ("reconnect within 99999 s", None),  # more digits than any window: not read as one
        ("reconnect within 9999 s", protocol.MAX_RECONNECT_SPREAD_S),  # held to the bound
        ("reconnect within 0 s", 0.0),
        ("going away; reconnect within 12.5 s; bye", 12.5),
    ],
)
def test_a_going_away_reason_is_read_defensively(reason, expected):
    assert protocol.reconnect_spread(reason) == expected
