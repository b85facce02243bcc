"""Artifact downloads in progress, per host, so that revoking or deleting a host cuts them at once.

A download is streamed by :func:`stream_file`, which registers itself in the app's
:class:`ActiveDownloads` for its host and checks between chunks whether it was aborted. An
abort shuts the socket down under the agent (which sees a truncated body, keeps its program and
reports the failure) instead of letting it finish a download its host may no longer make.
This module imports nothing from the app.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

CHUNK = 16 * 1024


class DownloadAborted(ConnectionAbortedError):
    """Raised inside the stream once its socket is cut; the server treats it as a dropped client."""


class Download:
    """One artifact stream to one host."""

    def __init__(self, host_id: int, sock: socket.socket | None):
        self.host_id = host_id
        self.sock = sock
        self.aborted = threading.Event()
        self.reason = ""

    def abort(self, reason: str) -> None:
        self.reason = reason
        self.aborted.set()
        if self.sock is not None:
            try:
                # shutdown, not close: the server thread still owns the socket object; this only
                # ends the TCP stream now, even while that thread sleeps for the rate limit
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ActiveDownloads:
    """Thread-safe map of host id to its streams in progress."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_host: dict[int, set[Download]] = {}

    def begin(self, host_id: int, sock: socket.socket | None) -> Download:
        dl = Download(host_id, sock)
        with self._lock:
            self._by_host.setdefault(host_id, set()).add(dl)
        return dl

    def end(self, dl: Download) -> None:
        with self._lock:
            streams = self._by_host.get(dl.host_id)
            if streams is not None:
                streams.discard(dl)
                if not streams:
                    del self._by_host[dl.host_id]

    def abort(self, host_id: int, reason: str) -> int:
        """Cut every download of ``host_id``; return how many were running."""
        with self._lock:
            streams = list(self._by_host.get(host_id, ()))
        for dl in streams:
            dl.abort(reason)
        if streams:
            log.info("cut %d download(s) of host %s: %s", len(streams), host_id, reason)
        return len(streams)

    def count(self, host_id: int | None = None) -> int:
        with self._lock:
            if host_id is None:
                return sum(len(s) for s in self._by_host.values())
            return len(self._by_host.get(host_id, ()))


def stream_file(
    registry: ActiveDownloads,
    host_id: int,
    path: str,
    sock: socket.socket | None = None,
    bytes_per_s: int = 0,
    chunk: int = CHUNK,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[bytes]:
    """Yield the file at ``path`` in chunks, at most ``bytes_per_s`` (0: unlimited), until aborted.

    The stream is registered before the first byte and checked between chunks (and during a rate
    sleep); an abort ends it with :class:`DownloadAborted` after the socket was shut down.
    """
    dl = registry.begin(host_id, sock)
    try:
        with open(path, "rb") as f:
            t0 = clock()
            sent = 0
            while block := f.read(chunk):
                if dl.aborted.is_set():
                    raise DownloadAborted(f"download cut after {sent} bytes: {dl.reason}")
                yield block
                sent += len(block)
                if bytes_per_s:
                    ahead = sent / bytes_per_s - (clock() - t0)
                    if ahead > 0 and dl.aborted.wait(ahead):
                        raise DownloadAborted(f"download cut after {sent} bytes: {dl.reason}")
    finally:
        registry.end(dl)
