"""Artifact streams register per host and stop between chunks once the host is cut off."""

import socket
import threading

import pytest

from app.agents.downloads import ActiveDownloads, DownloadAborted, stream_file

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "artifact.pyz"
    path.write_bytes(b"x" * 10_000)
    return str(path)


def test_a_stream_is_registered_while_it_runs_and_forgotten_after(artifact):
    reg = ActiveDownloads()
    stream = stream_file(reg, 7, artifact, chunk=4096)
    assert next(stream) == b"x" * 4096
    assert reg.count(7) == 1 and reg.count() == 1
    assert b"".join(stream) == b"x" * (10_000 - 4096)
    assert reg.count() == 0


def test_an_abort_ends_only_that_hosts_streams_and_shuts_their_socket(artifact):
    reg = ActiveDownloads()
    mine_sock, peer = socket.socketpair()
    mine = stream_file(reg, 7, artifact, sock=mine_sock, chunk=1000)
    other = stream_file(reg, 8, artifact, chunk=1000)
    next(mine), next(other)
    assert reg.abort(7, "host token revoked") == 1
    assert peer.recv(10) == b""  # the socket under the stream was shut down
    with pytest.raises(DownloadAborted, match="host token revoked"):
        next(mine)
    assert next(other) == b"x" * 1000
    assert reg.count(7) == 0 and reg.count(8) == 1
    mine_sock.close(), peer.close()


def test_an_abort_wakes_a_stream_waiting_for_the_rate_limit(artifact):
    reg = ActiveDownloads()
    # 1,000 s per chunk on a clock that stands still: waiting the rate limit out would be caught by
    # the test's timeout guard; only the abort can end this wait.
    stream = stream_file(reg, 7, artifact, bytes_per_s=1, chunk=1000, clock=lambda: 0.0)
    next(stream)
    threading.Timer(0.1, reg.abort, args=(7, "host deleted")).start()
    with pytest.raises(DownloadAborted, match="host deleted"):
        next(stream)
