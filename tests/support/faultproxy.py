"""A TCP proxy on 127.0.0.1 that passes the agent link through and can damage artifact downloads.

An agent configured with the proxy's address as its server talks to the real server through it.
WebSocket traffic is forwarded untouched; on a connection whose request is an artifact download
(``GET /agent/download/...``) the proxy can flip a byte of the body, cut the connection part way,
or stall — the faults a real network or a broken mirror produces. ``refuse`` cuts the host off:
every new connection is closed at once, while connections already open carry on untouched.
"""

from __future__ import annotations

import socket
import threading
import time

DAMAGE = ("corrupt", "cut", "stall")  # what a download connection suffers
MODES = ("pass", *DAMAGE, "refuse")


class FaultProxy:
    def __init__(self, upstream_port: int, mode: str = "pass", after_bytes: int = 4096, stall_s: float = 30.0):
        self.upstream_port = upstream_port
        self.mode = mode
        self.after_bytes = after_bytes
        self.stall_s = stall_s
        self.downloads = 0
        #: Switch to "refuse" the moment a download request passes: the downloading program
        #: finishes over the connections it has; whatever it starts next cannot reach the server.
        self.refuse_after_download = False
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.settimeout(0.2)
        self.port = self._lsock.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._lsock.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "refuse":  # the host is cut off: every new connection dies at once
                _shut(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            conn = {"download": False}
            threading.Thread(target=self._pipe_up, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._pipe_down, args=(upstream, client, conn), daemon=True).start()

    def _pipe_up(self, src: socket.socket, dst: socket.socket, conn: dict) -> None:
        first = True
        try:
            while data := src.recv(65536):
                if first:
                    conn["download"] = data.startswith(b"GET /agent/download/")
                    if conn["download"]:
                        self.downloads += 1
                        if self.refuse_after_download:
                            self.mode = "refuse"
                    first = False
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)

    def _pipe_down(self, src: socket.socket, dst: socket.socket, conn: dict) -> None:
        body_seen = 0
        headers_done = False
        buf = b""
        damaged = False
        try:
            while data := src.recv(65536):
                mode = self.mode if conn["download"] and self.mode in DAMAGE else "pass"
                if mode == "pass" or damaged:
                    dst.sendall(data)
                    continue
                if not headers_done:
                    buf += data
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    headers_done = True
                    head, data = buf[: end + 4], buf[end + 4 :]
                    dst.sendall(head)
                cut_at = self.after_bytes - body_seen
                if 0 <= cut_at < len(data):
                    damaged = True
                    if mode == "corrupt":
                        data = data[:cut_at] + bytes([data[cut_at] ^ 0xFF]) + data[cut_at + 1 :]
                        dst.sendall(data)
                        continue
                    dst.sendall(data[:cut_at])
                    if mode == "stall":
                        self._stop.wait(self.stall_s)
                    return  # "cut" (and a stall's end): the connection breaks off mid-body
                body_seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)
            _shut(src)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def wait_for_downloads(proxy: FaultProxy, n: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while proxy.downloads < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.downloads >= n
