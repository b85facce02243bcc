"""Commit or roll back, crash-safe start-up repair (sh guard and Python), signed-release refusals,
and hostile artifacts over a live link."""

import hashlib
import json
import os
import queue
import re
import subprocess
import time

import pytest

from agent import recovery, signing, statefile
from agent.client import Agent
from agent.daemon import EX_ROLLBACK_RESTART
from agent.statefile import read_state, write_state
from agent.updater import Timeouts, UpdateCommand, UpdateError, Updater

OLD = b"#!/usr/bin/env python3\nold program\n"
NEW = b"#!/usr/bin/env python3\nnew program\n"
GUARD = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "systemd", "restic-manager-agent-guard")


@pytest.fixture
def home(tmp_path):
    (tmp_path / "restic-manager-agent.pyz").write_bytes(NEW)
    (tmp_path / "restic-manager-agent.pyz.old").write_bytes(OLD)
    return tmp_path


def program_of(home):
    return str(home / "restic-manager-agent.pyz")


def put_marker(home, **fields):
    marker = statefile.new_marker("job-r", "1.0.0", "2.0.0", "ab" * 32)
    marker.update(fields)
    statefile.write_marker(str(home), marker)
    return marker


def run_guard(home, max_attempts=3):
    env = {**os.environ, recovery.MAX_ATTEMPTS_ENV: str(max_attempts)}
    r = subprocess.run(["sh", GUARD, str(home)], env=env, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return r.stderr


# --------------------------------------------------------------------------- the sh guard


def test_the_guard_is_valid_posix_sh_and_ships_in_the_agent():
    assert subprocess.run(["sh", "-n", GUARD], timeout=10).returncode == 0
    with open(GUARD, "rb") as fh:
        assert recovery.guard_text() == fh.read()


def test_the_guard_removes_leftovers_and_restores_a_missing_program(home):
    (home / "restic-manager-agent.pyz.new").write_bytes(b"partial")
    (home / "restic-manager-agent.pyz.old.tmp").write_bytes(b"half a copy")
    os.remove(program_of(home))
    run_guard(home)
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
    assert sorted(os.listdir(home)) == ["restic-manager-agent.pyz"]


def test_the_guard_counts_starts_and_rolls_back_a_crash_loop(home):
    put_marker(home)
    for n in (1, 2, 3):
        run_guard(home)
        assert statefile.read_marker(str(home))["attempts"] == n
        assert (home / "restic-manager-agent.pyz").read_bytes() == NEW
    err = run_guard(home)
    assert "crash-looped" in err
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
    marker = statefile.read_marker(str(home))
    assert marker["rollback"] == "new version 2.0.0 crash-looped: 3 starts without reaching the server"
    run_guard(home)  # a recorded rollback is left for the restored program; nothing else changes
    assert statefile.read_marker(str(home)) == marker
    # the restored program's start-up turns the marker into the outcome its hello reports
    assert recovery.repair(program_of(home), str(home), "1.0.0").action == "run"
    state = read_state(str(home))
    assert (state["job_id"], state["outcome"], state["error"]) == ("job-r", "rolled_back", marker["rollback"])
    assert statefile.read_marker(str(home)) is None


def test_the_guard_never_fails_the_start(tmp_path):
    (tmp_path / "probation.json").write_text("not json at all")
    run_guard(tmp_path)
    run_guard(tmp_path / "missing-dir")


# --------------------------------------------------------------------------- Python repair


def test_repair_removes_leftovers_and_settles_an_interrupted_update(home):
    (home / "restic-manager-agent.pyz.new").write_bytes(b"partial")
    write_state(str(home), {"job_id": "job-r", "version": "2.0.0", "from_version": "1.0.0", "outcome": "started"})
    result = recovery.repair(program_of(home), str(home), "1.0.0")
    assert result.action == "run" and "removed leftover restic-manager-agent.pyz.new" in result.notes
    state = read_state(str(home))
    assert state["outcome"] == "failed" and "interrupted" in state["error"] and state["reported"] is False


def test_repair_restores_a_missing_program(home):
    os.remove(program_of(home))
    recovery.repair(program_of(home), str(home), "1.0.0")
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD


def test_a_stale_marker_before_the_swap_is_reported_failed(home):
    put_marker(home)
    assert recovery.repair(program_of(home), str(home), "1.0.0").action == "run"
    state = read_state(str(home))
    assert state["outcome"] == "failed" and state["version"] == "2.0.0" and state["from_version"] == "1.0.0"
    assert statefile.read_marker(str(home)) is None


def test_the_new_program_goes_on_probation_and_reports_swapped(home):
    put_marker(home)
    result = recovery.repair(program_of(home), str(home), "2.0.0")
    assert result.action == "probation" and result.marker["starts"] == 1
    assert read_state(str(home))["outcome"] == "swapped"
    recovery.commit(str(home), result.marker)
    state = read_state(str(home))
    assert (state["outcome"], state["reported"]) == ("committed", True)
    assert statefile.read_marker(str(home)) is None
    assert (home / "restic-manager-agent.pyz.old").read_bytes() == OLD  # kept as the previous version


def test_python_counts_starts_when_there_is_no_guard(home):
    put_marker(home)
    for _ in range(3):
        assert recovery.repair(program_of(home), str(home), "2.0.0", limit=3).action == "probation"
    assert recovery.repair(program_of(home), str(home), "2.0.0", limit=3).action == "restart"
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
    state = read_state(str(home))
    assert state["outcome"] == "rolled_back" and "3 starts" in state["error"]


def test_an_interrupted_rollback_is_finished(home):
    put_marker(home, rollback="new version 2.0.0 never reached the server within 60 s")
    assert recovery.repair(program_of(home), str(home), "2.0.0").action == "restart"
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
    assert read_state(str(home))["error"] == "new version 2.0.0 never reached the server within 60 s"


def test_without_old_there_is_no_rollback_and_the_new_program_keeps_running(home):
    os.remove(str(home / "restic-manager-agent.pyz.old"))
    put_marker(home, starts=3)
    assert recovery.repair(program_of(home), str(home), "2.0.0", limit=3).action == "run"
    assert (home / "restic-manager-agent.pyz").read_bytes() == NEW
    assert "cannot roll back" in read_state(str(home))["error"]
    assert statefile.read_marker(str(home)) is None


def test_an_unreadable_marker_is_dropped(home):
    (home / "probation.json").write_text("{broken")
    assert recovery.repair(program_of(home), str(home), "2.0.0").action == "run"
    assert not (home / "probation.json").exists()


def test_the_marker_is_one_key_per_line_for_the_guard(home):
    put_marker(home)
    lines = (home / "probation.json").read_text().splitlines()
    assert '"attempts": 0,' in lines and '"rollback": null,' in lines and '"to_version": "2.0.0"' in lines


def test_probation_cannot_be_stretched_by_a_clock_that_went_back():
    marker = {"started_at": 1000.0}
    assert recovery.probation_remaining(marker, 60, now=1010.0) == pytest.approx(50)
    assert recovery.probation_remaining(marker, 60, now=500.0) == pytest.approx(60)
    assert recovery.probation_remaining({}, 60, now=5.0) == pytest.approx(60)


# --------------------------------------------------------------------------- probation in the agent


def probation_agent(home, make_config, url, **config):
    put_marker(home)
    cfg = make_config(url, probation_s=config.pop("probation_s", 0.5), **config)
    return Agent(cfg, version="2.0.0", program=program_of(home), sleep=lambda s: time.sleep(0.05))


def test_a_welcome_commits_the_new_program(home, peer, make_config, run_agent):
    def handler(conn):
        conn.recv_type("hello")
        conn.welcome(heartbeat_s=0.05)
        while True:
            conn.recv(timeout=5)

    server = peer(handler)
    runner = run_agent(probation_agent(home, make_config, server.url))
    deadline = time.monotonic() + 5
    while (read_state(str(home)) or {}).get("outcome") != "committed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_state(str(home))["outcome"] == "committed"
    time.sleep(0.7)  # past the probation window: a committed program stays
    assert runner.thread.is_alive() and (home / "restic-manager-agent.pyz").read_bytes() == NEW
    runner.stop()


def test_no_welcome_within_probation_rolls_back_and_exits(home, peer, make_config, run_agent):
    hellos = queue.Queue()

    def handler(conn):
        hellos.put(conn.recv_type("hello").data)
        conn.ws.receive(timeout=10)  # never welcomed

    server = peer(handler)
    runner = run_agent(probation_agent(home, make_config, server.url))
    assert runner.wait(5) == EX_ROLLBACK_RESTART
    assert hellos.get(timeout=1)["last_update"]["outcome"] == "swapped"
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
    state = read_state(str(home))
    assert state["outcome"] == "rolled_back"
    assert state["error"] == "new version 2.0.0 never reached the server within 0.5 s"


# --------------------------------------------------------------------------- refusals before download


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(OLD)
    return path


def signed_command(key_pem, body=NEW, version="2.0.0", platform=None, **kw):
    sha = hashlib.sha256(body).hexdigest()
    sig = signing.sign(key_pem, signing.manifest_bytes(version, platform or "py3-any", len(body), sha))
    kw.setdefault("signature", sig)
    return UpdateCommand("job-1", version, "http://127.0.0.1:9/x", sha, len(body), platform=platform, **kw)


def refusal(program, cmd, current="1.0.0", **kw):
    updater = Updater(str(program), str(program.parent), "ws://h", "tok", current, **kw)
    with pytest.raises(UpdateError) as exc:
        updater.run(cmd, lambda *a: None)
    assert program.read_bytes() == OLD and read_state(str(program.parent)) is None
    return str(exc.value)


def test_refusals_name_the_problem(program, release_key):
    pem, pub = release_key
    other_pem, _ = signing.generate_keypair()
    good = signed_command(pem)
    assert "unsigned release refused" in refusal(program, signed_command(pem, signature=None), release_public_key=pub)
    assert "bad release signature" in refusal(program, signed_command(other_pem), release_public_key=pub)
    # a tampered hash under the original signature: the manifest no longer matches
    tampered = UpdateCommand("job-1", "2.0.0", good.url, "0" * 64, good.size, signature=good.signature)
    assert "bad release signature" in refusal(program, tampered, release_public_key=pub)
    # the signature covers the platform: claiming another one breaks it, and it is not ours anyway
    assert "does not match this agent's 'py3-any'" in refusal(
        program, signed_command(pem, platform="linux-x86_64"), release_public_key=pub
    )
    assert "refusing a downgrade" in refusal(program, signed_command(pem, version="0.9"), release_public_key=pub)
    assert "unsigned release refused" in refusal(program, signed_command(pem))  # no key, no opt-out
    assert "invalid version" in refusal(program, signed_command(pem, version="2.0'; rm -rf /"), allow_unsigned=True)


def test_an_explicit_downgrade_and_the_unsigned_opt_out_are_accepted(program, release_key, artifact_server):
    pem, pub = release_key
    server = artifact_server(NEW)
    cmd = signed_command(pem, version="0.9", allow_downgrade=True)
    Updater(str(program), str(program.parent), "ws://h", "tok", "1.0.0", release_public_key=pub).run(
        UpdateCommand(cmd.job_id, cmd.version, server.url(), cmd.sha256, cmd.size, cmd.signature, None, True),
        lambda *a: None,
    )
    assert program.read_bytes() == NEW


# --------------------------------------------------------------------------- hostile artifacts over a link

BODY = os.urandom(150_000)


def flipped(data):
    data = bytearray(data)
    data[len(data) // 3] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("truncated", r"download size mismatch: server sent Content-Length 75000, expected 150000"),
        ("oversized", r"download too large: more than the expected 150000 bytes"),
        ("bit-flipped", "sha256 mismatch"),
        ("wrongly-signed", "bad release signature"),
        ("unsigned", "unsigned release refused"),
        ("closed-half-way", "download truncated: got 75000 of 150000 bytes"),
        ("stalled", r"download stalled: no data for 0.3 s after \d+ of 150000 bytes"),
    ],
)
def test_a_hostile_artifact_is_refused_and_the_agent_keeps_running(
    case, expected, peer, make_config, run_agent, program, artifact_server, release_key
):
    pem, pub = release_key
    served = {"truncated": BODY[:75_000], "bit-flipped": flipped(BODY)}.get(case, BODY)
    files = artifact_server(served)
    files.mode = {"oversized": "oversize", "closed-half-way": "truncate", "stalled": "stall"}.get(case, "ok")
    key = signing.generate_keypair()[0] if case == "wrongly-signed" else pem
    data = signed_command(key, BODY).__dict__ | {"url": files.url()}
    data = {k: v for k, v in data.items() if v is not None and k != "allow_downgrade"}
    if case == "unsigned":
        del data["signature"]
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome(heartbeat_s=0.1)
        conn.send("command.update", data)
        got.put(conn.recv_type("update.result", skip=("heartbeat", "update.progress")).data)
        ping = conn.send("ping")
        got.put(conn.recv_type("pong", skip=("heartbeat",)).data["ref"] == ping)
        while True:  # keep the link until the agent stops, so it does not reconnect and retry
            conn.recv(timeout=10)

    def factory(cmd):
        return Updater(
            str(program),
            str(program.parent),
            "ws://h",
            "tok",
            "1.0.0",
            timeouts=Timeouts(connect_s=2, read_s=0.3, deadline_s=10),
            release_public_key=pub,
        )

    server = peer(handler)
    cfg = make_config(server.url, release_public_key=pub, allow_unsigned_updates=False)
    runner = run_agent(Agent(cfg, version="1.0.0", program=str(program), updater_factory=factory))
    result = got.get(timeout=10)
    assert result["ok"] is False and re.search(expected, result["error"]), result["error"]
    assert got.get(timeout=5) is True  # still answering on the link
    assert runner.thread.is_alive()
    assert program.read_bytes() == OLD
    assert not os.path.exists(str(program) + ".new") and not os.path.exists(program.parent / "probation.json")
    if case in ("wrongly-signed", "unsigned"):
        assert files.requests == []  # refused before a byte was downloaded
    runner.stop()


def test_state_and_marker_are_json_the_server_can_read(home):
    put_marker(home)
    assert json.loads((home / "probation.json").read_text())["job_id"] == "job-r"
