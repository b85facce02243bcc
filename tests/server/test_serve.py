"""The two-plane server: it stops promptly (both loops at once, idle connections included) and its
agent sockets send small frames without delay."""

from __future__ import annotations

import socket

from app.agents.server import AgentServer
from tests.support.live import LiveClient, LiveServer

IDLE_TIMEOUT_S = 300.0


def test_stop_ends_both_planes_at_once_even_with_an_idle_keep_alive_connection(app, cast):
    server = LiveServer(app)
    # The admin loop's idle timeout (1 s in production), made far longer than any load noise: the
    # loop thread can only end in time if stop() wakes it, not by waiting the timeout out.
    server.servers.admin.adj.asyncore_loop_timeout = IDLE_TIMEOUT_S
    server.__enter__()
    admin = LiveClient(server.admin_url).login()  # a requests.Session: its connection stays open
    assert admin.get_json("/api/hosts")["hosts"]
    server.__exit__(None, None, None)
    for t in server.servers._threads:
        t.join(timeout=IDLE_TIMEOUT_S / 10)  # woken: ends at once; not woken: still in its idle wait
    assert not any(t.is_alive() for t in server.servers._threads)
    assert not server.servers.admin._map  # listener, trigger and the idle connection all closed


def test_agent_plane_sockets_send_small_frames_at_once(app):
    """TCP_NODELAY on every accepted agent socket: a command then a pong are not held by Nagle."""
    server = AgentServer("127.0.0.1", 0, app, backlog=16)
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=5):
            accepted, _ = server.get_request()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.server_close()
