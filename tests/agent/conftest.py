"""Fixtures for the agent tests: a fake agent-plane peer, a local artifact server, real zipapp hosts.

The classes behind them live in tests/support (peers.py, live.py), shared with the other suites.
"""

from __future__ import annotations

import pytest

from agent.config import parse_config
from tests.support import live
from tests.support.peers import AgentThread, ArtifactServer, PeerServer


@pytest.fixture
def peer():
    """Return a factory: ``peer(handler)`` starts a PeerServer closed at teardown."""
    servers = []

    def make(handler):
        server = PeerServer(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def artifact_server():
    servers = []

    def make(body: bytes, token: str = "tok", tls=None):
        server = ArtifactServer(body, token, tls)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def make_config(tmp_path):
    """Return a factory building an AgentConfig whose state_dir is the test's temp dir."""

    def make(server_url="ws://127.0.0.1:9", **overrides):
        # unsigned updates allowed unless a test pins a key: most tests are about other things
        raw = {
            "server_url": server_url,
            "token": "tok",
            "state_dir": str(tmp_path),
            "backoff_max_s": 1,
            "allow_unsigned_updates": True,
        }
        raw.update(overrides)
        return parse_config(raw, str(tmp_path / "agent.toml"))

    return make


@pytest.fixture
def run_agent():
    """Return a factory starting an Agent in a thread; the agent is stopped at teardown."""
    started = []

    def start(agent):
        runner = AgentThread(agent).start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.agent.request_stop()
        runner.thread.join(3)


@pytest.fixture(scope="session")
def release_key():
    """The run's release key pair (the one real servers sign with): (PKCS8 PEM bytes, base64 public key)."""
    return live.release_key_pem(), live.release_key()[1]


@pytest.fixture(scope="session")
def agent_builds(tmp_path_factory):
    """Real zipapps 1.0.0 and 2.0.0 signed with ``release_key``: the run's shared builds."""
    out = str(tmp_path_factory.getbasetemp() / "agent-builds")
    return {v: live.agent_build(v, out) for v in ("1.0.0", "2.0.0")}


@pytest.fixture
def zipapp_host(tmp_path):
    """Return a factory for :class:`ZipappHost`; every host's supervisor is stopped at teardown."""
    hosts = []

    def make(*args, **kwargs):
        host = live.ZipappHost(tmp_path, *args, **kwargs)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.stop()
