"""The agent plane serving TLS itself (RM_AGENT_TLS_CERT/KEY): wss:// and https, TLS 1.2 or newer,
each handshake in its connection's own thread."""

from __future__ import annotations

import socket
import ssl
import time
import warnings

import pytest
import requests

from app.extensions import db
from app.models import Host
from tests.support.live import LiveServer
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tls_live(app, cast, pki):
    app.config.update(
        AGENT_TLS_CERT=pki.server.cert,
        AGENT_TLS_KEY=pki.server.key,
        HEARTBEAT_S=0.2,
        HEARTBEAT_TIMEOUT=1.0,
        BUILD_AGENT_ON_START=False,
    )
    with LiveServer(app) as server:
        yield server


def trusting(pki, **versions) -> ssl.SSLContext:
    """A client context that trusts only the test CA, as a pinned agent does."""
    ctx = ssl.create_default_context(cafile=pki.ca)
    for attr, value in versions.items():
        setattr(ctx, attr, value)
    return ctx


def test_the_agent_plane_answers_https_and_the_websocket_over_wss(tls_live, cast, pki):
    assert tls_live.agent_ws_url.startswith("wss://") and tls_live.agent_http_url.startswith("https://")
    r = requests.get(tls_live.agent_http_url + "/agent/health", verify=pki.ca, timeout=5)
    assert r.status_code == 200 and r.json()["ok"] is True
    script = requests.get(tls_live.agent_http_url + "/agent/install.sh", verify=pki.ca, timeout=5)
    assert script.text.startswith("#!/bin/sh")

    agent = ScriptedAgent(tls_live.agent_ws_url, cast.host_offline_token, "1.5.0", ssl_context=trusting(pki))
    welcome = agent.connect()
    assert welcome.data["server_version"] == "2.0.0"
    assert isinstance(agent.ws.sock, ssl.SSLSocket)
    assert agent.ws.sock.version() in ("TLSv1.2", "TLSv1.3")

    def online():
        db.session.rollback()
        host = db.session.get(Host, cast.host_offline.id)
        return host.connected and host.agent_version == "1.5.0"

    wait_until(online, what="the wss agent online")
    agent.disconnect()


def test_a_client_that_does_not_trust_the_certificate_gets_no_link(tls_live, cast, pki):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_live.agent_http_url + "/agent/health", verify=pki.other_ca, timeout=5)
    agent = ScriptedAgent(
        tls_live.agent_ws_url,
        cast.host_offline_token,
        "1.5.0",
        ssl_context=ssl.create_default_context(cafile=pki.other_ca),
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        agent.connect()
    db.session.rollback()
    assert db.session.get(Host, cast.host_offline.id).connected is False


def test_plain_http_on_the_tls_port_gets_no_http_answer(tls_live):
    with socket.create_connection(("127.0.0.1", tls_live.servers.agent_port), timeout=5) as s:
        s.sendall(b"GET /agent/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert not answer.startswith(b"HTTP/")


def test_tls_older_than_1_2_is_refused_by_the_server(tls_live, pki):
    assert tls_live.servers.agent.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point is to offer the deprecated versions
        old = trusting(pki, minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.0/1.1 at all
    with socket.create_connection(("127.0.0.1", tls_live.servers.agent_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError) as e:
            old.wrap_socket(raw, server_hostname="127.0.0.1")
    # The server's alert, not the client failing to offer anything.
    assert "PROTOCOL_VERSION" in str(e.value) or "UNSUPPORTED_PROTOCOL" in str(e.value), e.value
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = trusting(pki, minimum_version=version, maximum_version=version)
        with socket.create_connection(("127.0.0.1", tls_live.servers.agent_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                assert s.version() == version.name.replace("v1_", "v1.")


class SteppedClock:
    """The agent plane's clock, moved only by the test: the handshake deadline passes when told."""

    def __init__(self):
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def test_silent_connections_do_not_hold_up_other_handshakes_and_are_closed(tls_live, pki):
    server = tls_live.servers.agent
    clock = server.clock = SteppedClock()
    server.handshake_timeout = 2.0  # the pending deadline covers the TLS handshake
    silent = [socket.create_connection(("127.0.0.1", tls_live.servers.agent_port), timeout=5) for _ in range(5)]
    try:
        r = requests.get(tls_live.agent_http_url + "/agent/health", verify=pki.ca, timeout=5)
        assert r.status_code == 200
        # Answered while every silent handshake is still pending: it did not queue behind them.
        wait_until(lambda: server.pending >= 5, what="the silent connections accepted as pending")
        for s in silent:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        clock.now += server.handshake_timeout  # their deadline passes (and a sweep is due)
        for s in silent:
            s.settimeout(20)
            assert s.recv(1) == b""  # the server gave up on the handshake and closed it
    finally:
        for s in silent:
            s.close()


def test_over_the_pending_cap_a_tls_connection_is_closed_and_the_port_keeps_serving(tls_live, pki):
    server = tls_live.servers.agent
    server.max_pending = 2
    server.handshake_timeout = 60.0  # the two silent ones stay pending however slow this machine is
    silent = [socket.create_connection(("127.0.0.1", tls_live.servers.agent_port), timeout=5) for _ in range(2)]
    try:
        wait_until(lambda: server.pending == 2, what="two pending connections")
        with pytest.raises(requests.exceptions.ConnectionError):  # closed: no plaintext 503 before a handshake
            requests.get(tls_live.agent_http_url + "/agent/health", verify=pki.ca, timeout=5)
    finally:
        for s in silent:
            s.close()
    wait_until(lambda: server.pending == 0, what="the silent connections released")
    r = requests.get(tls_live.agent_http_url + "/agent/health", verify=pki.ca, timeout=5)
    assert r.status_code == 200
