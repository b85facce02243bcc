"""The connection loop against a real WebSocket peer on loopback."""

import hashlib
import json
import logging
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import simple_websocket

from agent import protocol, statefile
from agent.client import Agent
from agent.daemon import EX_OK, EX_UPDATE_RESTART
from agent.statefile import read_state
from agent.updater import UpdateError

pytestmark = pytest.mark.timeout(20)


def new_agent(config, **kw):
    kw.setdefault("program", None)
    kw.setdefault("version", "1.0.0")
    kw.setdefault("sleep", lambda s: None)
    return Agent(config, **kw)


def test_it_authenticates_and_sends_a_complete_hello(peer, make_config, run_agent):
    hellos = queue.Queue()

    def handler(conn):
        hellos.put((conn, conn.recv()))
        conn.welcome()
        conn.recv_type("never", timeout=5)

    server = peer(handler)
    runner = run_agent(new_agent(make_config(server.url)))
    conn, hello = hellos.get(timeout=5)
    assert conn.path == "/ws/agent"
    assert conn.headers["authorization"] == "Bearer tok"
    assert hello.type == "hello"
    data = hello.data
    assert set(protocol.SCHEMAS["hello"]) <= set(data)
    assert data["agent_version"] == "1.0.0"
    assert data["os"] == platform.system().lower()
    assert data["arch"] == platform.machine()
    assert data["python"] == platform.python_version()
    assert data["capabilities"] == []  # run from source: it cannot replace itself
    assert data["last_update"] is None
    assert data["platform"] == "py3-any"
    assert data["boot_id"]
    assert runner.stop() == EX_OK


def test_it_announces_update_only_when_it_can_replace_its_program(make_config, tmp_path):
    program = tmp_path / "restic-manager-agent.pyz"
    program.write_bytes(b"x")
    assert new_agent(make_config(), program=str(program)).hello_data()["capabilities"] == ["update"]
    assert new_agent(make_config(), program=str(tmp_path / "missing.pyz")).hello_data()["capabilities"] == []


def test_it_announces_update_only_with_a_pinned_key_or_the_unsigned_opt_out(make_config, tmp_path, release_key):
    program = tmp_path / "restic-manager-agent.pyz"
    program.write_bytes(b"x")
    pinned = make_config(allow_unsigned_updates=False, release_public_key=release_key[1])
    assert new_agent(pinned, program=str(program)).hello_data()["capabilities"] == ["update"]
    neither = make_config(allow_unsigned_updates=False)
    assert new_agent(neither, program=str(program)).hello_data()["capabilities"] == []


def test_it_sends_heartbeats_at_the_interval_from_welcome(peer, make_config, run_agent):
    beats = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome(heartbeat_s=0.05)
        for _ in range(3):
            beats.put(conn.recv().type)

    server = peer(handler)
    run_agent(new_agent(make_config(server.url)))
    assert [beats.get(timeout=3) for _ in range(3)] == ["heartbeat"] * 3


def test_it_answers_ping_with_pong_and_bad_frames_with_errors(peer, make_config, run_agent):
    answers = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome()
        ping_id = conn.send("ping")
        answers.put(("pong", ping_id, conn.recv_type("pong")))
        conn.send_raw("not json at all")
        answers.put(("garbage", None, conn.recv_type("error")))
        conn.send_raw(json.dumps({"type": "reboot", "id": "r-1", "data": {}}))
        answers.put(("unknown", "r-1", conn.recv_type("error")))
        conn.send_raw(json.dumps({"type": "welcome", "id": "w-2", "data": {"server_version": "1"}}))
        answers.put(("missing", "w-2", conn.recv_type("error")))
        hb_id = conn.send("heartbeat")
        answers.put(("unexpected", hb_id, conn.recv_type("error")))
        ping_id = conn.send("ping")  # still connected after all that
        answers.put(("pong again", ping_id, conn.recv_type("pong")))

    server = peer(handler)
    run_agent(new_agent(make_config(server.url)))
    got = {name: (ref, env) for name, ref, env in (answers.get(timeout=5) for _ in range(6))}
    assert got["pong"][1].data == {"ref": got["pong"][0]}
    assert got["garbage"][1].data["code"] == "invalid_json"
    assert got["unknown"][1].data["code"] == "unknown_type"
    assert got["unknown"][1].data["ref"] == "r-1"
    assert got["missing"][1].data["code"] == "missing_field"
    assert "heartbeat_s" in got["missing"][1].data["message"]
    assert got["unexpected"][1].data["code"] == "unexpected_type"
    assert got["pong again"][1].data == {"ref": got["pong again"][0]}


def test_it_reconnects_after_the_server_drops_the_link(peer, make_config, run_agent):
    hellos = queue.Queue()
    sleeps = []

    def handler(conn):
        hellos.put(conn.recv_type("hello"))
        conn.welcome()
        if len(server.connections) == 1:
            conn.close(1011, "server restarting")
        else:
            conn.recv_type("never", timeout=5)

    server = peer(handler)
    agent = new_agent(make_config(server.url), sleep=sleeps.append, rand=lambda: 1.0)
    run_agent(agent)
    hellos.get(timeout=5)
    hellos.get(timeout=5)
    assert agent.connections == 2
    assert sleeps == [0.5]  # the dropped link had been welcomed, so backoff starts over


def test_a_revoked_token_keeps_retrying_with_capped_backoff(peer, make_config, run_agent, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    sleeps = []
    done = threading.Event()

    def handler(conn):
        conn.recv_type("hello")
        conn.close(protocol.CLOSE_REVOKED, "token revoked")

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) >= 4:
            done.set()
            agent.request_stop()

    server = peer(handler)
    agent = new_agent(make_config(server.url, backoff_max_s=1), sleep=sleep, rand=lambda: 1.0)
    runner = run_agent(agent)
    assert done.wait(10)
    assert runner.wait() == EX_OK
    assert sleeps == [0.5, 1, 1, 1]
    assert "revoked this agent's token" in caplog.text


def test_a_refused_upgrade_is_logged_and_retried(peer, make_config, run_agent, caplog):
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) >= 2:
            agent.request_stop()

    server = peer(lambda conn: None)
    server.reject_status = 401
    agent = new_agent(make_config(server.url), sleep=sleep, rand=lambda: 1.0)
    assert run_agent(agent).wait(5) == EX_OK
    assert sleeps == [0.5, 1]
    assert "refused this agent's token (HTTP 401)" in caplog.text


def test_no_welcome_in_time_means_reconnect(peer, make_config, run_agent):
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        agent.request_stop()

    server = peer(lambda conn: conn.recv_type("never", timeout=5, skip=("hello",)))
    agent = new_agent(make_config(server.url), sleep=sleep, welcome_timeout=0.2)
    assert run_agent(agent).wait(5) == EX_OK
    assert len(sleeps) == 1


def test_stop_closes_the_link_promptly(peer, make_config, run_agent):
    closed = queue.Queue()
    welcomed = threading.Event()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome()
        welcomed.set()
        try:
            while conn.ws.receive(timeout=5) is not None:
                pass
        except simple_websocket.ConnectionClosed:
            closed.put(conn.ws.close_reason)

    server = peer(handler)
    runner = run_agent(new_agent(make_config(server.url)))
    assert welcomed.wait(5)  # stop only once the link is up, so the close is what is measured
    assert runner.stop(timeout=2) == EX_OK
    assert closed.get(timeout=2) == protocol.CLOSE_NORMAL


def server_connected(server, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.connections:
            return True
        time.sleep(0.01)
    return False


# ----------------------------------------------------------------- updates over the link

NEW = b"new program " * 20_000


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(b"old program")
    return path


def update_data(url, body=NEW, job_id="job-1", sha256=None, version="2.0.0", **extra):
    return {
        "job_id": job_id,
        "version": version,
        "url": url,
        "sha256": sha256 or hashlib.sha256(body).hexdigest(),
        "size": len(body),
        **extra,
    }


class BlockingUpdater:
    """Stands in for the updater: the update 'runs' until ``release`` is set, then fails."""

    def __init__(self, release: threading.Event):
        self.release = release

    def run(self, cmd, progress, cancelled):
        self.release.wait(5)
        raise UpdateError("stopped by the test")


def test_an_update_over_the_link_swaps_reports_and_exits_for_restart(
    peer, make_config, run_agent, program, artifact_server
):
    files = artifact_server(NEW)
    frames = queue.Queue()
    all_read = threading.Event()

    def handler(conn):
        hello = conn.recv_type("hello")
        assert hello.data["capabilities"] == ["update"]
        conn.welcome(heartbeat_s=0.05)
        conn.send("command.update", update_data(files.url()))
        while True:
            env = conn.recv(timeout=5)
            frames.put(env)
            if env.type == "update.progress" and env.data["phase"] == "restarting":
                all_read.set()
                return

    server = peer(handler)
    agent = new_agent(make_config(server.url), program=str(program))
    runner = run_agent(agent)
    assert runner.wait(10) == EX_UPDATE_RESTART
    # the agent exits as soon as its close is answered; the handler may still be reading frames
    assert all_read.wait(5)
    assert program.read_bytes() == NEW
    assert (program.parent / "restic-manager-agent.pyz.old").read_bytes() == b"old program"
    seen = []
    while not frames.empty():
        env = frames.get()
        if env.type == "update.progress" and (not seen or seen[-1] != env.data["phase"]):
            seen.append(env.data["phase"])
    assert seen == ["downloading", "verifying", "staging", "restarting"]

    # the restarted agent says where it came from, once
    hellos = queue.Queue()

    def second(conn):
        hellos.put(conn.recv_type("hello"))
        conn.welcome()
        conn.recv_type("never", timeout=5)

    server2 = peer(second)
    restarted = run_agent(new_agent(make_config(server2.url), program=str(program), version="2.0.0"))
    last = hellos.get(timeout=5).data["last_update"]
    assert last == {"job_id": "job-1", "outcome": "swapped", "error": None, "from_version": "1.0.0", "version": "2.0.0"}
    # the welcome (sent right after that hello) commits the new program and marks the report seen
    deadline = time.monotonic() + 5
    while not read_state(str(program.parent)).get("reported") and time.monotonic() < deadline:
        time.sleep(0.02)
    restarted.stop()
    state = read_state(str(program.parent))
    assert state["reported"] is True and state["outcome"] == "committed"


def test_a_failed_update_is_reported_and_the_agent_keeps_running(
    peer, make_config, run_agent, program, artifact_server
):
    files = artifact_server(NEW)
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome()
        conn.send("command.update", update_data(files.url(), sha256="0" * 64))
        got.put(conn.recv_type("update.result", skip=("heartbeat", "update.progress")))
        ping = conn.send("ping")
        got.put((ping, conn.recv_type("pong", skip=("heartbeat", "update.progress"))))

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=str(program)))
    result = got.get(timeout=5)
    assert result.data["job_id"] == "job-1" and result.data["ok"] is False
    assert result.data["error"].startswith("sha256 mismatch: expected " + "0" * 64 + " got ")
    ping, pong = got.get(timeout=5)
    assert pong.data["ref"] == ping
    assert program.read_bytes() == b"old program"
    assert not (program.parent / "restic-manager-agent.pyz.new").exists()


def test_a_second_update_while_one_runs_is_refused(peer, make_config, run_agent, program):
    release = threading.Event()
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome()
        conn.send("command.update", update_data("/a", job_id="job-1"))
        conn.send("command.update", update_data("/a", job_id="job-2"))
        got.put(conn.recv_type("update.result"))
        release.set()
        got.put(conn.recv_type("update.result"))

    server = peer(handler)
    blocked = BlockingUpdater(release)
    run_agent(new_agent(make_config(server.url), program=str(program), updater_factory=lambda cmd: blocked))
    second = got.get(timeout=5)
    assert second.data["job_id"] == "job-2"
    assert second.data["error"] == "another update (job job-1) is already in progress"
    first = got.get(timeout=5)
    assert (first.data["job_id"], first.data["error"]) == ("job-1", "stopped by the test")


def test_an_agent_that_cannot_update_says_so(peer, make_config, run_agent):
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        conn.welcome()
        conn.send("command.update", update_data("/a"))
        got.put(conn.recv_type("update.result"))

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=None))
    assert "cannot self-update" in got.get(timeout=5).data["error"]


def test_stop_is_honoured_while_a_connect_hangs(make_config, run_agent):
    release = threading.Event()

    def hanging_connect(url, token):
        release.wait(5)
        raise OSError("released")

    agent = new_agent(make_config(), connect=hanging_connect, tick=0.02)
    runner = run_agent(agent)
    try:
        assert runner.stop(timeout=1) == EX_OK
    finally:
        release.set()


# ``python -m agent`` with the handshake timeout (10 s) made 300 s: an agent that only stopped once
# its handshake gave up would outlive the test's bounds by far.
_AGENT_WITH_A_LONG_HANDSHAKE_TIMEOUT = (
    "import sys, agent.transport as t\n"
    "d = list(t.WebSocketClient.__init__.__defaults__); d[0] = 300.0\n"
    "t.WebSocketClient.__init__.__defaults__ = tuple(d)\n"
    "from agent.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.timeout(120)
def test_sigterm_stops_a_real_agent_process_mid_handshake(tmp_path):
    # a listener that never answers: the agent sits in its WebSocket handshake
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config = tmp_path / "agent.toml"
        config.write_text(f'server_url = "ws://127.0.0.1:{silent.getsockname()[1]}"\ntoken = "t"\n')
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = subprocess.Popen(
            [sys.executable, "-c", _AGENT_WITH_A_LONG_HANDSHAKE_TIMEOUT, "--config", str(config)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            silent.settimeout(30)
            conn, _ = silent.accept()  # the agent has connected and is waiting for the handshake answer
            with conn:
                time.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                # 60 s: far from load noise, far below the 300 s handshake timeout
                assert proc.wait(timeout=60) == EX_OK
            err = proc.stderr.read()
            assert "stopped by signal 15" in err
            assert "cannot connect" not in err, err  # the stop did not wait for the handshake to fail
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


# ----------------------------------------------------------------- replayed and misdirected commands
# A command.update counts once, and only for its own host (issue 9). The same cases through a real
# server and a frame-injecting proxy: tests/e2e/test_update_trust.py.


def welcome_as(conn, host_id=None):
    data = {"server_version": "9.9.9", "heartbeat_s": 30}
    if host_id is not None:
        data["host_id"] = host_id
    conn.send("welcome", data)


def round_trip(conn, skip=("heartbeat", "update.progress")):
    """Ping and wait for the pong: every frame sent before the ping has been handled."""
    ping = conn.send("ping")
    assert conn.recv_type("pong", skip=skip).data["ref"] == ping


def test_a_command_for_another_host_is_refused_without_a_download(
    peer, make_config, run_agent, program, artifact_server
):
    files = artifact_server(NEW)
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        welcome_as(conn, host_id=7)
        cmd_id = conn.send("command.update", update_data(files.url(), host_id=8))
        got.put((cmd_id, conn.recv_type("error")))
        no_id = conn.send("command.update", update_data(files.url(), job_id="job-2"))  # no host_id at all
        got.put((no_id, conn.recv_type("error")))
        round_trip(conn)
        got.put("done")

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=str(program)))
    for _ in range(2):
        cmd_id, err = got.get(timeout=5)
        assert err.data["code"] == "wrong_host" and err.data["ref"] == cmd_id, err.data
    assert got.get(timeout=5) == "done"
    assert files.requests == []
    assert program.read_bytes() == b"old program"


def test_a_command_for_this_host_is_carried_out(peer, make_config, run_agent, program, artifact_server):
    files = artifact_server(NEW)
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        welcome_as(conn, host_id=7)
        conn.send("command.update", update_data(files.url(), host_id=7))
        got.put(conn.recv_type("update.progress"))

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=str(program)))
    assert got.get(timeout=5).data["job_id"] == "job-1"


def test_a_job_already_run_is_ignored_even_by_the_next_program(peer, make_config, run_agent, program, artifact_server):
    files = artifact_server(NEW)
    files.mode = "truncate"  # the first run fails, so the agent stays and a replay can follow
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        welcome_as(conn)
        conn.send("command.update", update_data(files.url()))
        got.put(conn.recv_type("update.result", skip=("heartbeat", "update.progress")))
        conn.send("command.update", update_data(files.url()))  # the replay
        round_trip(conn)
        got.put("done")

    server = peer(handler)
    runner = run_agent(new_agent(make_config(server.url), program=str(program)))
    assert got.get(timeout=5).data["error"].startswith("download truncated")
    assert got.get(timeout=5) == "done"
    runner.stop()
    assert len(files.requests) == 1

    # A restarted agent (the memory is on disk) ignores the same frame too.
    def again(conn):
        conn.recv_type("hello")
        welcome_as(conn)
        conn.send("command.update", update_data(files.url()))
        round_trip(conn)
        got.put("done again")

    server2 = peer(again)
    run_agent(new_agent(make_config(server2.url), program=str(program)))
    assert got.get(timeout=5) == "done again"
    assert len(files.requests) == 1
    assert program.read_bytes() == b"old program"


def test_a_duplicate_of_the_running_job_is_ignored(peer, make_config, run_agent, program):
    release = threading.Event()
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        welcome_as(conn)
        conn.send("command.update", update_data("/a"))
        conn.send("command.update", update_data("/a"))  # the same job again, while it runs
        round_trip(conn)
        release.set()
        got.put(conn.recv_type("update.result"))
        round_trip(conn)
        got.put("done")

    server = peer(handler)
    blocked = BlockingUpdater(release)
    run_agent(new_agent(make_config(server.url), program=str(program), updater_factory=lambda cmd: blocked))
    result = got.get(timeout=5)
    assert (result.data["job_id"], result.data["error"]) == ("job-1", "stopped by the test")
    assert got.get(timeout=5) == "done"  # and no second update.result came before the pong


def test_the_running_version_is_answered_and_old_is_never_touched(
    peer, make_config, run_agent, program, artifact_server
):
    files = artifact_server(NEW)
    (program.parent / "restic-manager-agent.pyz.old").write_bytes(b"the program to roll back to")
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        welcome_as(conn)
        conn.send("command.update", update_data(files.url(), version="2.0.0"))
        got.put(conn.recv_type("update.result"))

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=str(program), version="2.0.0"))
    result = got.get(timeout=5)
    assert result.data["ok"] is False and "already runs version 2.0.0" in result.data["error"]
    assert files.requests == []
    assert (program.parent / "restic-manager-agent.pyz.old").read_bytes() == b"the program to roll back to"


def test_the_job_memory_is_bounded_and_survives_a_corrupt_file(tmp_path):
    d = str(tmp_path)
    for i in range(statefile.JOB_MEMORY + 6):
        statefile.remember_job(d, f"job-{i}")
    ids = statefile.ran_jobs(d)
    assert len(ids) == statefile.JOB_MEMORY
    assert ids[0] == "job-6" and ids[-1] == f"job-{statefile.JOB_MEMORY + 5}"
    assert not statefile.ran_job(d, "job-0") and statefile.ran_job(d, "job-6")
    (tmp_path / statefile.JOBS_FILE).write_text("{not json")
    assert statefile.ran_jobs(d) == []
    statefile.remember_job(d, "job-x")
    assert statefile.ran_jobs(d) == ["job-x"]
