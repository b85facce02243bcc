"""The two-plane server stops promptly: both accept loops end at once, idle connections included."""

from __future__ import annotations

import time

from tests.support.live import LiveClient, LiveServer


def test_stop_ends_both_planes_at_once_even_with_an_idle_keep_alive_connection(app, cast):
    server = LiveServer(app).__enter__()
    admin = LiveClient(server.admin_url).login()  # a requests.Session: its connection stays open
    assert admin.get_json("/api/hosts")["hosts"]
    t0 = time.monotonic()
    server.__exit__(None, None, None)
    assert time.monotonic() - t0 < 1.0  # was bounded only by the loops' idle timeouts (0.5 s + 1 s)
    assert not any(t.is_alive() for t in server.servers._threads)
    assert not server.servers.admin._map  # listener, trigger and the idle connection all closed
