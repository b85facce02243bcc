"""Real receivers for notifications, on 127.0.0.1 ephemeral ports: a webhook endpoint and an SMTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: How old a webhook timestamp may be before the receiver refuses it (replay protection).
MAX_AGE_S = 300


def verify(secret: str, headers, body: bytes, now: float, max_age_s: float = MAX_AGE_S) -> bool:
    """The receiver's check from docs/operations.md: fresh timestamp, HMAC-SHA256 over ``ts.body``."""
    timestamp = headers.get("X-RM-Timestamp", "")
    signature = headers.get("X-RM-Signature", "")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > max_age_s:
        return False
    expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


class WebhookReceiver:
    """An HTTP endpoint that checks each call's signature and timestamp and keeps the good ones.

    ``now`` is the receiver's clock (epoch seconds); ``statuses`` scripts the answers (a list of
    status codes used up one per call, then 204).
    """

    def __init__(self, secret: str, now: Callable[[], float] = time.time, statuses: list[int] | None = None):
        self.secret, self.now = secret, now
        self.statuses = list(statuses or [])
        self.accepted: list[dict] = []
        self.rejected: list[dict] = []
        self.calls = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._cond:
                    receiver.calls += 1
                    status = receiver.statuses.pop(0) if receiver.statuses else 204
                    ok = verify(receiver.secret, self.headers, body, receiver.now())
                    record = {"headers": dict(self.headers), "body": body, "json": json.loads(body)}
                    if not ok:
                        status = 401
                        receiver.rejected.append(record)
                    elif status < 300:
                        receiver.accepted.append(record)
                    receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="webhook-receiver", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/rm-secret-path"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float = 10.0) -> list[dict]:
        """Wait until ``predicate(accepted)`` holds; return the accepted calls."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.accepted), timeout):
                raise AssertionError(f"webhook calls never matched: {[c['json'].get('event') for c in self.accepted]}")
            return list(self.accepted)


def free_port() -> int:
    """A port nothing listens on right now (bound to 0 and closed); also a destination that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mailbox:
    """An aiosmtpd SMTP server on a free port that keeps every message it receives."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self._cond = threading.Condition()
        box = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
                from email import message_from_bytes
                from email.policy import default

                with box._cond:
                    box.messages.append((envelope, message_from_bytes(envelope.content, policy=default)))
                    box._cond.notify_all()
                return "250 Message accepted for delivery"

        # The controller checks it is up by connecting to its own port, so it needs a real one.
        self.port = free_port()
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> Mailbox:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"expected {n} message(s), got {len(self.messages)}")
            return list(self.messages)
