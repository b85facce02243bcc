"""Fault injection on the agent side: a real zipapp under a restarting supervisor, the sh guard
before every start (as systemd's ExecStartPre= runs it), a fake agent plane and artifact server.

Each case asserts: the installed program still runs and is one of the two verified builds, nothing
half-written is left over, and the next hello's ``last_update`` tells the job's outcome.
The agent SIGKILLs itself at the step named by ``RM_AGENT_FAILPOINT`` (test-only, once per state
directory); the supervisor restarts it.
"""

import hashlib

import pytest

from agent import signing
from tests.support.peers import UpdatePeer, update_command

pytestmark = pytest.mark.timeout(60)


def start_update(peer, artifact_server, agent_builds, release_key, zipapp_host, body=None, probation_s=None, **env):
    a, b = agent_builds["1.0.0"], agent_builds["2.0.0"]
    with open(b.path, "rb") as fh:
        b_bytes = fh.read()
    body = b_bytes if body is None else body
    files = artifact_server(body)
    if body is b_bytes:
        command = update_command(b, job_id="job-f", url=files.url())
    else:  # another artifact, properly signed as version 2.0.0
        sha = hashlib.sha256(body).hexdigest()
        sig = signing.sign(release_key[0], signing.manifest_bytes("2.0.0", "py3-any", len(body), sha))
        command = update_command(b, job_id="job-f", url=files.url(), sha256=sha, size=len(body), signature=sig)
    welcome_new = env.pop("welcome_new", True)
    server = UpdatePeer(peer, command, welcome_if=lambda hello: welcome_new or hello["agent_version"] != "2.0.0")
    config = {"probation_s": probation_s} if probation_s is not None else {}
    host = zipapp_host(a.path, server.url, release_key[1], **config).start(**env)
    first = server.next_hello(host=host)
    assert first["agent_version"] == "1.0.0" and first["last_update"] is None
    return server, host, a, b


def sha256_of(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def assert_runnable_and_verified(host, a, b, expected_version):
    assert host.leftovers() == []
    assert sha256_of(host.program) in (a.sha256, b.sha256)
    assert host.installed_version() == expected_version
    assert sha256_of(host.program) == {"1.0.0": a.sha256, "2.0.0": b.sha256}[expected_version]


@pytest.mark.parametrize("failpoint", ["after_download", "after_old", "between_renames"])
def test_killed_before_the_swap_keeps_the_old_program_and_reports_failed(
    failpoint, peer, artifact_server, agent_builds, release_key, zipapp_host
):
    server, host, a, b = start_update(
        peer, artifact_server, agent_builds, release_key, zipapp_host, RM_AGENT_FAILPOINT=failpoint
    )
    again = server.next_hello(host=host)
    assert host.supervisor.exit_codes[0] == -9  # SIGKILLed at the failpoint
    assert again["agent_version"] == "1.0.0"
    last = again["last_update"]
    assert (last["job_id"], last["outcome"], last["version"]) == ("job-f", "failed", "2.0.0")
    assert "interrupted" in last["error"] and "restarted at version 1.0.0" in last["error"]
    assert not (host.home / "probation.json").exists()
    host.stop()
    assert_runnable_and_verified(host, a, b, "1.0.0")


@pytest.mark.parametrize("failpoint", ["after_swap", "before_reexec", "before_welcome_commit"])
def test_killed_after_the_swap_the_new_program_commits_once_welcomed(
    failpoint, peer, artifact_server, agent_builds, release_key, zipapp_host
):
    server, host, a, b = start_update(
        peer, artifact_server, agent_builds, release_key, zipapp_host, RM_AGENT_FAILPOINT=failpoint
    )
    hello = server.next_hello(host=host)
    assert hello["agent_version"] == "2.0.0"
    assert hello["last_update"]["job_id"] == "job-f" and hello["last_update"]["outcome"] == "swapped"
    if failpoint == "before_welcome_commit":  # killed after the welcome: one more start, same report
        hello = server.next_hello(host=host)
        assert hello["agent_version"] == "2.0.0" and hello["last_update"]["outcome"] == "swapped"
    host.wait_committed()
    assert -9 in host.supervisor.exit_codes
    host.stop()
    assert_runnable_and_verified(host, a, b, "2.0.0")
    assert sha256_of(str(host.program) + ".old") == a.sha256  # kept as the previous version


def test_a_new_program_that_cannot_start_is_rolled_back_by_the_guard(
    peer, artifact_server, agent_builds, release_key, zipapp_host
):
    broken = b"#!/usr/bin/env python3\nimport sys\nsys.exit(3)\n"  # signed and verified, but dead on arrival
    server, host, a, b = start_update(peer, artifact_server, agent_builds, release_key, zipapp_host, body=broken)
    again = server.next_hello(host=host)
    assert again["agent_version"] == "1.0.0"
    assert again["last_update"]["outcome"] == "rolled_back"
    assert again["last_update"]["error"] == "new version 2.0.0 crash-looped: 3 starts without reaching the server"
    # The old agent re-executed itself into the broken program (same process, counted as the first
    # attempt); the supervisor's two restarts ran the guard, whose next start restored the old one.
    assert "agent.reexec: restarting in place" in host.log()
    assert host.supervisor.exit_codes[:3] == [3, 3, 3], host.log()
    assert host.supervisor.restarts == 3
    host.stop()
    assert_runnable_and_verified(host, a, b, "1.0.0")
    assert not (host.home / "probation.json").exists()


def test_a_new_program_that_never_reaches_the_server_is_rolled_back_after_probation(
    peer, artifact_server, agent_builds, release_key, zipapp_host
):
    server, host, a, b = start_update(
        peer, artifact_server, agent_builds, release_key, zipapp_host, probation_s=1, welcome_new=False
    )
    unwelcomed = server.next_hello(host=host)
    assert unwelcomed["agent_version"] == "2.0.0"
    back = server.next_hello(host=host)
    assert back["agent_version"] == "1.0.0"
    assert back["last_update"]["outcome"] == "rolled_back"
    assert back["last_update"]["error"] == "new version 2.0.0 never reached the server within 1 s"
    # swap and rollback both restarted in place: one process throughout, no supervisor restart
    assert host.supervisor.restarts == 0 and host.log().count("agent.reexec: restarting in place") == 2, host.log()
    host.stop()
    assert_runnable_and_verified(host, a, b, "1.0.0")
    assert not (host.home / "probation.json").exists()
