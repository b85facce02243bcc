"""The POSIX update path against a real local HTTP server: swap, and every failure before it."""

import hashlib
import json
import os
from collections import namedtuple

import pytest

import agent.updater.posix as posix
from agent import signing
from agent.statefile import last_update_for_hello, mark_reported, read_state
from agent.updater import (
    Timeouts,
    UpdateCommand,
    UpdateError,
    Updater,
    resolve_url,
)

OLD = b"#!/usr/bin/env python3\nold program\n"


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


NEW = os.urandom(200_000)
KEY_PEM, KEY_PUB = signing.generate_keypair()
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(OLD)
    path.chmod(0o750)
    return path


def command(url, body=NEW, sha256=None, size=None, job_id="job-1", version="2.0.0", **kw):
    """An update command whose manifest is signed with the test release key."""
    sha256 = sha256 or hashlib.sha256(body).hexdigest()
    size = len(body) if size is None else size
    kw.setdefault("signature", signing.sign(KEY_PEM, signing.manifest_bytes(version, "py3-any", size, sha256)))
    return UpdateCommand(job_id=job_id, version=version, url=url, sha256=sha256, size=size, **kw)


def make_updater(program, token="tok", server_url="ws://127.0.0.1:9", **kw):
    kw.setdefault("release_public_key", KEY_PUB)
    return Updater(str(program), str(program.parent), server_url, token, "1.0.0", **kw)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, phase, done, total):
        self.events.append((phase, done, total))

    @property
    def phases(self):
        out = []
        for phase, _, _ in self.events:
            if not out or out[-1] != phase:
                out.append(phase)
        return out


def assert_untouched(program, failed=True):
    """The program is intact, nothing is staged, and a failure after the checks is on record."""
    assert program.read_bytes() == OLD
    assert not os.path.exists(str(program) + ".new")
    assert not os.path.exists(str(program) + ".old")
    assert not os.path.exists(program.parent / "probation.json")
    state = read_state(str(program.parent))
    if failed:
        assert state["outcome"] == "failed" and state["error"] and state["job_id"] == "job-1"
    else:
        assert state is None


def test_it_downloads_verifies_and_swaps_keeping_the_old_program(program, artifact_server, monkeypatch):
    server = artifact_server(NEW)
    synced = []
    real_fsync_dir = posix.fsync_dir
    monkeypatch.setattr(posix, "fsync_dir", lambda d: (synced.append(d), real_fsync_dir(d)))
    progress = Recorder()

    make_updater(program).run(command(server.url()), progress)

    assert program.read_bytes() == NEW
    assert (program.parent / "restic-manager-agent.pyz.old").read_bytes() == OLD
    assert not os.path.exists(str(program) + ".new")
    assert program.stat().st_mode & 0o777 == 0o750
    assert synced == [str(program.parent)]
    assert server.requests[0]["authorization"] == "Bearer tok"
    assert progress.phases == ["downloading", "verifying", "staging", "restarting"]
    downloads = [e for e in progress.events if e[0] == "downloading"]
    assert downloads[0] == ("downloading", 0, len(NEW)) and downloads[-1] == ("downloading", len(NEW), len(NEW))
    assert len(downloads) <= len(NEW) // (64 * 1024) + 3  # throttled, not one per chunk
    state = read_json(program.parent / "update-state.json")
    assert state["job_id"] == "job-1" and state["outcome"] == "swapped"
    assert (state["version"], state["from_version"], state["reported"]) == ("2.0.0", "1.0.0", False)


def test_a_path_url_is_fetched_from_the_server_over_http(program, artifact_server):
    server = artifact_server(NEW)
    make_updater(program, server_url=f"ws://127.0.0.1:{server.port}").run(command("/agent/download/2.0.0"), Recorder())
    assert server.requests[0]["path"] == "/agent/download/2.0.0"
    assert program.read_bytes() == NEW


def test_a_second_update_replaces_the_previous_old_file(program, artifact_server):
    (program.parent / "restic-manager-agent.pyz.old").write_bytes(b"ancient")
    server = artifact_server(NEW)
    make_updater(program).run(command(server.url()), Recorder())
    assert (program.parent / "restic-manager-agent.pyz.old").read_bytes() == OLD


def test_a_sha256_mismatch_leaves_the_program_intact(program, artifact_server):
    server = artifact_server(NEW)
    wrong = "ab" * 32
    with pytest.raises(UpdateError) as exc:
        make_updater(program).run(command(server.url(), sha256=wrong), Recorder())
    assert str(exc.value) == f"sha256 mismatch: expected {wrong} got {hashlib.sha256(NEW).hexdigest()}"
    assert_untouched(program)


@pytest.mark.parametrize(
    "mode, error",
    [
        # a body larger than announced is cut off
        ("oversize", "download too large: more than the expected 200000 bytes"),
        # a Content-Length that disagrees with the command is refused before the body is read
        ("wrong-length", "Content-Length 200005, expected 200000"),
        # a connection closed half way is a truncated download
        ("truncate", r"download truncated: got \d+ of 200000 bytes"),
    ],
)
def test_a_body_that_is_not_the_announced_size_is_refused(program, artifact_server, mode, error):
    server = artifact_server(NEW)
    server.mode = mode
    with pytest.raises(UpdateError, match=error):
        make_updater(program).run(command(server.url()), Recorder())
    assert_untouched(program)


def test_a_stalled_download_hits_the_read_timeout(program, artifact_server):
    server = artifact_server(NEW)
    server.mode = "stall"
    updater = make_updater(program, timeouts=Timeouts(connect_s=2, read_s=0.2, deadline_s=10))
    with pytest.raises(UpdateError, match=r"download stalled: no data for 0.2 s after \d+ of 200000 bytes"):
        updater.run(command(server.url()), Recorder())
    assert_untouched(program)


def test_the_overall_deadline_bounds_a_slow_download(program, artifact_server):
    server = artifact_server(NEW)
    ticks = iter(range(0, 10_000, 50))  # every clock read is 50 s later
    updater = make_updater(program, clock=lambda: next(ticks), timeouts=Timeouts(deadline_s=120))
    with pytest.raises(UpdateError, match="download timed out"):
        updater.run(command(server.url()), Recorder())
    assert_untouched(program)


def test_a_wrong_token_is_reported_as_refused(program, artifact_server):
    server = artifact_server(NEW, token="right")
    with pytest.raises(UpdateError, match=r"HTTP 401 .*\(agent token refused\)"):
        make_updater(program, token="wrong").run(command(server.url()), Recorder())
    assert_untouched(program)


def test_an_unreachable_server_is_reported(program):
    with pytest.raises(UpdateError, match="cannot reach 127.0.0.1:9"):
        make_updater(program).run(command("http://127.0.0.1:9/x"), Recorder())
    assert_untouched(program)


def test_it_checks_free_space_before_downloading(program, artifact_server):
    server = artifact_server(NEW)
    updater = make_updater(program, disk_usage=lambda path: Usage(10**9, 10**9, 1000))
    with pytest.raises(UpdateError, match=r"not enough free space in .*: need \d+ bytes, 1000 available"):
        updater.run(command(server.url()), Recorder())
    assert server.requests == []
    assert_untouched(program, failed=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sha256": "xyz"}, "invalid sha256"), ({"size": 0}, "invalid artifact size")],
)
def test_it_refuses_a_malformed_command(program, kwargs, message):
    with pytest.raises(UpdateError, match=message):
        make_updater(program).run(command("http://127.0.0.1:9/x", **kwargs), Recorder())
    assert_untouched(program, failed=False)


def test_it_refuses_an_artifact_for_another_platform(program):
    cmd = command("/x", platform="linux-x86_64")
    with pytest.raises(UpdateError, match="does not match this agent's 'py3-any'"):
        make_updater(program).run(cmd, Recorder())


def test_a_cancelled_update_removes_the_partial_download(program, artifact_server):
    server = artifact_server(NEW)
    with pytest.raises(UpdateError, match="cancelled"):
        make_updater(program).run(command(server.url()), Recorder(), cancelled=lambda: True)
    assert_untouched(program)


def test_it_refuses_when_the_program_is_missing(tmp_path):
    updater = Updater(str(tmp_path / "gone.pyz"), str(tmp_path), "ws://h", "t", "1")
    with pytest.raises(UpdateError, match="cannot self-update"):
        updater.run(command("/x"), Recorder())


@pytest.mark.parametrize(
    "server_url, url, expected",
    [
        ("ws://127.0.0.1:8081", "/agent/download/2.0", "http://127.0.0.1:8081/agent/download/2.0"),
        ("wss://rm.example.org", "/agent/download/2.0", "https://rm.example.org/agent/download/2.0"),
        ("ws://h:1", "https://cdn.example.org/a.pyz", "https://cdn.example.org/a.pyz"),
    ],
)
def test_resolve_url_maps_ws_to_http(server_url, url, expected):
    assert resolve_url(server_url, url) == expected


def test_resolve_url_refuses_other_schemes():
    with pytest.raises(UpdateError, match="unsupported download URL scheme 'ftp'"):
        resolve_url("ws://h", "ftp://h/a")


def test_the_next_hello_reports_the_swap_once(program, artifact_server):
    server = artifact_server(NEW)
    make_updater(program).run(command(server.url()), Recorder())
    state_dir = str(program.parent)
    expected = {"job_id": "job-1", "outcome": "swapped", "error": None, "from_version": "1.0.0", "version": "2.0.0"}
    assert last_update_for_hello(state_dir, "2.0.0") == expected
    mark_reported(state_dir)
    assert last_update_for_hello(state_dir, "2.0.0") is None


def test_a_restart_at_another_version_is_reported_as_failed(program, artifact_server):
    server = artifact_server(NEW)
    make_updater(program).run(command(server.url()), Recorder())
    last = last_update_for_hello(str(program.parent), "1.0.0")
    assert last["outcome"] == "failed"
    assert last["error"] == "restarted at version 1.0.0, expected 2.0.0 after the swap"


def test_an_https_download_trusts_the_pinned_server_ca(program, artifact_server, pki):
    server = artifact_server(NEW, tls=pki.server)
    updater = make_updater(program, server_url=f"wss://127.0.0.1:{server.port}", server_ca=pki.ca)
    updater.run(command("/agent/download/2.0.0"), Recorder())  # a path: https on the wss server
    assert program.read_bytes() == NEW
    assert server.requests == [{"path": "/agent/download/2.0.0", "authorization": "Bearer tok"}]


@pytest.mark.parametrize(
    "impostor, pinned, why",
    [
        ("foreign", True, "unable to get local issuer certificate"),  # another CA's certificate
        ("wrong_name", True, "IP address mismatch"),  # the pinned CA's, for another name
        ("server", False, "unable to get local issuer certificate"),  # nothing pinned: the system store
    ],
)
def test_an_https_download_from_a_server_it_cannot_verify_is_refused(
    program, artifact_server, pki, impostor, pinned, why
):
    server = artifact_server(NEW, tls=getattr(pki, impostor))
    updater = make_updater(program, server_url=f"wss://127.0.0.1:{server.port}", server_ca=pki.ca if pinned else None)
    with pytest.raises(UpdateError) as e:
        updater.run(command("/agent/download/2.0.0"), Recorder())
    assert "download failed: the server's certificate is not trusted" in str(e.value) and why in str(e.value)
    assert (pki.ca if pinned else "the system's CA store") in str(e.value)
    assert server.requests == []  # the request, and the agent token with it, never left
    assert_untouched(program)
