"""A real zipapp agent under a restarting supervisor updates itself from version A to B."""

import os
import queue
import shutil
import sys
import time

import pytest

from agent.build import build_agent
from app.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)


def test_the_supervisor_restarts_a_program_that_exits(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with Supervisor(cmd, cwd=str(tmp_path), restart_sec=0.01) as sup:
        assert sup.wait_for_restarts(2, timeout=10)
    assert sup.exit_codes[:2] == [3, 3]
    assert "--- supervisor: exited with 3" in sup.log_text()


def test_the_supervisor_stops_a_running_program_with_sigterm(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"]
    sup = Supervisor(cmd, cwd=str(tmp_path)).start()
    start = time.monotonic()
    assert sup.stop() == -15
    assert time.monotonic() - start < 5
    assert sup.restarts == 0


def test_a_zipapp_agent_updates_itself_and_comes_back_at_the_new_version(tmp_path, peer, artifact_server):
    a = build_agent("1.0.0", str(tmp_path / "build-a"))
    b = build_agent("2.0.0", str(tmp_path / "build-b"))
    with open(b.path, "rb") as fh:
        b_bytes = fh.read()
    home = tmp_path / "home"
    home.mkdir()
    program = home / "restic-manager-agent.pyz"
    shutil.copyfile(a.path, program)
    files = artifact_server(b_bytes)
    events = queue.Queue()

    def handler(conn):
        hello = conn.recv_type("hello")
        events.put(("hello", hello))
        conn.welcome(heartbeat_s=0.2, server_version="2.0.0")
        if hello.data["agent_version"] == "1.0.0" and hello.data["last_update"] is None:
            conn.send(
                "command.update",
                {
                    "job_id": "job-e2e",
                    "version": "2.0.0",
                    "url": files.url("/agent/download/2.0.0"),
                    "sha256": b.sha256,
                    "size": b.size,
                },
            )
        while True:
            env = conn.recv(timeout=10)
            if env.type == "update.progress":
                events.put(("progress", env))

    server = peer(handler)
    config = home / "agent.toml"
    config.write_text(f'server_url = "{server.url}"\ntoken = "tok"\nlog_level = "DEBUG"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    sup = Supervisor([sys.executable, "-I", str(program), "--config", str(config)], cwd=str(home), env=env)
    with sup:
        seen = []
        hellos = []
        while len(hellos) < 2:
            kind, env_ = events.get(timeout=15)
            if kind == "hello":
                hellos.append(env_.data)
            elif not seen or seen[-1] != env_.data["phase"]:
                seen.append(env_.data["phase"])
        assert sup.restarts == 1
        assert sup.exit_codes == [0]
    assert hellos[0]["agent_version"] == "1.0.0"
    assert hellos[0]["capabilities"] == ["update"]
    assert seen == ["downloading", "verifying", "staging", "restarting"]
    assert hellos[1]["agent_version"] == "2.0.0"
    assert hellos[1]["last_update"] == {
        "job_id": "job-e2e",
        "outcome": "swapped",
        "error": None,
        "from_version": "1.0.0",
        "version": "2.0.0",
    }
    assert program.read_bytes() == b_bytes
    with open(a.path, "rb") as fh:
        assert (home / "restic-manager-agent.pyz.old").read_bytes() == fh.read()
    assert sup.exit_codes == [0, 0], sup.log_text()  # SIGTERM is a clean stop too
