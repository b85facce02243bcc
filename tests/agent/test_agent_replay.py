"""A ``command.update`` counts once, and only for its own host (issue 9, item 1).

The agent against a real WebSocket peer and a real artifact server on loopback; the peer plays
an attacker who replays, duplicates or misdirects commands. The same cases through a real server
and a frame-injecting proxy are in ``tests/e2e/test_update_trust.py``.
"""

import hashlib
import queue
import threading

import pytest

from agent import statefile
from agent.client import Agent

pytestmark = pytest.mark.timeout(20)

NEW = b"new program " * 2_000


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(b"old program")
    return path


def new_agent(config, **kw):
    kw.setdefault("version", "1.0.0")
    kw.setdefault("sleep", lambda s: None)
    return Agent(config, **kw)


def command(url, job_id="job-1", version="2.0.0", **extra):
    return {
        "job_id": job_id,
        "version": version,
        "url": url,
        "sha256": hashlib.sha256(NEW).hexdigest(),
        "size": len(NEW),
        **extra,
    }


def welcome(conn, host_id=None):
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
        welcome(conn, host_id=7)
        cmd_id = conn.send("command.update", command(files.url(), host_id=8))
        got.put((cmd_id, conn.recv_type("error")))
        no_id = conn.send("command.update", command(files.url(), job_id="job-2"))  # no host_id at all
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
        welcome(conn, host_id=7)
        conn.send("command.update", command(files.url(), host_id=7))
        got.put(conn.recv_type("update.progress", skip=("heartbeat",)))

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=str(program)))
    assert got.get(timeout=5).data["job_id"] == "job-1"


def test_a_job_already_run_is_ignored_even_by_the_next_program(peer, make_config, run_agent, program, artifact_server):
    files = artifact_server(NEW)
    files.mode = "truncate"  # the first run fails, so the agent stays and a replay can follow
    got = queue.Queue()

    def handler(conn):
        conn.recv_type("hello")
        welcome(conn)
        conn.send("command.update", command(files.url()))
        got.put(conn.recv_type("update.result", skip=("heartbeat", "update.progress")))
        conn.send("command.update", command(files.url()))  # the replay
        round_trip(conn)
        got.put("done")

    server = peer(handler)
    config = make_config(server.url)
    runner = run_agent(new_agent(config, program=str(program)))
    assert got.get(timeout=5).data["error"].startswith("download truncated")
    assert got.get(timeout=5) == "done"
    runner.stop()
    assert len(files.requests) == 1

    # A restarted agent (the memory is on disk) ignores the same frame too.
    def again(conn):
        conn.recv_type("hello")
        welcome(conn)
        conn.send("command.update", command(files.url()))
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

    class SlowUpdater:
        def run(self, cmd, progress, cancelled):
            release.wait(5)
            from agent.updater import UpdateError

            raise UpdateError("stopped by the test")

    def handler(conn):
        conn.recv_type("hello")
        welcome(conn)
        conn.send("command.update", command("/a"))
        conn.send("command.update", command("/a"))  # the same job again, while it runs
        round_trip(conn)
        release.set()
        got.put(conn.recv_type("update.result"))
        round_trip(conn)
        got.put("done")

    server = peer(handler)
    run_agent(new_agent(make_config(server.url), program=str(program), updater_factory=lambda cmd: SlowUpdater()))
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
        welcome(conn)
        conn.send("command.update", command(files.url(), version="2.0.0"))
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
