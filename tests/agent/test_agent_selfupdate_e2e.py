"""A real zipapp agent under a restarting supervisor updates itself from version A to B."""

import sys

import pytest

from tests.support.peers import UpdatePeer, update_command
from tests.support.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)


def test_the_supervisor_restarts_a_program_that_exits(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with Supervisor(cmd, cwd=str(tmp_path), restart_sec=0.01) as sup:
        assert sup.wait_for_restarts(2, timeout=10)
    assert sup.exit_codes[:2] == [3, 3]
    assert "--- supervisor: exited with 3" in sup.log_text()


def test_the_supervisor_stops_a_running_program_with_sigterm(tmp_path):
    # The program would run for an hour and the SIGKILL fallback waits 60 s (far from load noise):
    # -15 says SIGTERM ended it, neither its own end (0) nor the fallback (-9).
    cmd = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(3600)"]
    sup = Supervisor(cmd, cwd=str(tmp_path), stop_timeout=60.0).start()
    assert sup.stop() == -15
    assert not sup._thread.is_alive()  # the restart loop ended too: no restart after a stop
    assert sup.restarts == 0


@pytest.mark.parametrize("restart_mode", ["exec", "exit"])
def test_a_zipapp_agent_updates_itself_commits_and_keeps_the_old_program(
    restart_mode, peer, artifact_server, agent_builds, release_key, zipapp_host
):
    a, b = agent_builds["1.0.0"], agent_builds["2.0.0"]
    with open(b.path, "rb") as fh:
        b_bytes = fh.read()
    files = artifact_server(b_bytes)
    server = UpdatePeer(peer, update_command(b, job_id="job-e2e", url=files.url("/agent/download/2.0.0")))
    host = zipapp_host(a.path, server.url, release_key[1], restart_mode=f'"{restart_mode}"').start()

    first = server.next_hello(host=host)
    assert first["agent_version"] == "1.0.0"
    assert first["capabilities"] == ["update"]
    pid = host.supervisor.pid
    second = server.next_hello(host=host)
    assert second["agent_version"] == "2.0.0"
    assert second["last_update"] == {
        "job_id": "job-e2e",
        "outcome": "swapped",
        "error": None,
        "from_version": "1.0.0",
        "version": "2.0.0",
    }
    # welcomed at the new version: committed, the marker gone, .old kept as the previous version
    host.wait_committed()
    assert server.phases() == ["downloading", "verifying", "staging", "restarting"]
    if restart_mode == "exec":
        # the shipped way: the same process re-executed the new file; the supervisor never restarted it
        assert host.supervisor.restarts == 0 and host.supervisor.exit_codes == [], host.log()
        assert host.supervisor.pid == pid
        assert "agent.reexec: restarting in place: " in host.log()
    else:
        # restart_mode = "exit" (and the fallback when the exec fails): exit 0, the supervisor starts it
        assert host.supervisor.restarts == 1 and host.supervisor.exit_codes == [0], host.log()
        assert "restarting in place" not in host.log()
    assert host.program.read_bytes() == b_bytes
    with open(a.path, "rb") as fh:
        assert (host.home / "restic-manager-agent.pyz.old").read_bytes() == fh.read()
    host.stop()
    assert host.supervisor.exit_codes[-1] == 0, host.log()  # SIGTERM is a clean stop too
    assert host.installed_version() == "2.0.0"
