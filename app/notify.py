"""Notifications: new alerts and finished rollouts, sent to Apprise URLs and a signed JSON webhook.

The events come from the runtime's announcements (``alert_raised``, ``fleet_finished``), which are
published only after the transaction that recorded them commits (:mod:`app.oncommit`). Nothing
here runs on a request or scheduler thread: :meth:`Notifier.submit` only puts the event on a
bounded queue, and one notifier thread (started by ``serve``/``demo``, like the scheduler) sends
it to every destination, retrying with exponential backoff. A destination that is down costs a
logged warning and a "last delivery failed" line on ``/settings/notifications``; a full queue
drops the event with a warning. Delivery state is kept in memory, per process, like the queue
itself (docs/operations.md, "Notifications").

The webhook body is JSON, signed with HMAC-SHA256 over ``<timestamp>.<body>``
(``X-RM-Timestamp``, ``X-RM-Signature: sha256=<hex>``); receivers reject stale timestamps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app

from .errors import Refusal
from .extensions import db
from .models import AuditEvent
from .runtime import runtime
from .timeutil import isoformat

log = logging.getLogger(__name__)

#: The longest pause between two attempts at one destination.
MAX_BACKOFF_S = 300.0
#: Longest error text kept for the settings page.
MAX_ERROR_CHARS = 300

EVENT_ALERT = "alert.raised"
EVENT_FLEET = "fleet_update.finished"
EVENT_TEST = "test"


class DeliveryError(Exception):
    """One attempt at one destination failed; the message is safe to show (no secrets)."""


# --- events ------------------------------------------------------------------------------------


def _link(public_url: str | None, path: str) -> str:
    return f"{public_url}{path}" if public_url else path


def _event(kind: str, title: str, text: str, level: str, now: dt.datetime, **data: Any) -> dict:
    head = {"event": kind, "id": str(uuid.uuid4()), "at": isoformat(now), "title": title, "text": text}
    return {**head, "level": level, **data}


def alert_event(alert: dict, public_url: str | None, now: dt.datetime) -> dict:
    """The notification for a newly opened alert (``alert`` as :meth:`Alert.to_dict` gives it)."""
    path = f"/hosts/{alert['host_id']}" if alert.get("host_id") else "/alerts"
    url = _link(public_url, path)
    title = {"update_failed": "Agent update failed", "fleet_update_halted": "Fleet update halted"}.get(
        alert["kind"], alert["kind"]
    )
    if alert.get("host"):
        title += f": {alert['host']}"
    return _event(EVENT_ALERT, title, f"{alert['message']}\n{url}", "failure", now, alert=alert, url=url)


def fleet_event(summary: dict, public_url: str | None, now: dt.datetime) -> dict:
    """The notification for a rollout that reached a terminal state, with its counts."""
    fid, status = summary["id"], summary["status"]
    counts = summary.get("counts", {})
    url = _link(public_url, f"/settings/fleet-update/{fid}/report")  # the run report's page
    api_url = _link(public_url, f"/api/fleet-updates/{fid}")
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    title = f"Fleet update {fid} to {summary['target_version']} {status}"
    lines = [f"{title}: {parts or 'no hosts'} ({summary.get('total', 0)} hosts)"]
    if summary.get("wall_time_s") is not None:
        lines[0] += f" in {_duration(summary['wall_time_s'])}"
    if summary.get("halt_reason"):
        lines.append(f"Halted at {summary['halt_reason']}")
    lines.append(url)
    level = {"succeeded": "success", "halted": "failure"}.get(status, "warning")
    report_url = _link(public_url, f"/api/fleet-updates/{fid}/report")
    return _event(
        EVENT_FLEET,
        title,
        "\n".join(lines),
        level,
        now,
        fleet_update=summary,
        url=url,
        api_url=api_url,
        report_url=report_url,
    )


def probe_event(actor: str, public_url: str | None, now: dt.datetime) -> dict:
    url = _link(public_url, "/settings/notifications")
    return _event(
        EVENT_TEST,
        "restic-manager test notification",
        f"A test notification sent by {actor}. If you read this, this destination works.\n{url}",
        "info",
        now,
        actor=actor,
        url=url,
    )


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m}m {s}s" if h else (f"{m}m {s}s" if m else f"{s}s")


# --- destinations ------------------------------------------------------------------------------


def _secret_parts(url: str) -> list[str]:
    """The parts of a URL that may be secret (password, path segments, query values), longest first."""
    parts = urlsplit(url)
    found = [parts.password or "", parts.username or ""]
    found += [seg for seg in parts.path.split("/") if seg]
    found += [kv.partition("=")[2] for kv in parts.query.split("&")]
    host = parts.netloc.rpartition("@")[2].partition(":")[0]  # as written (``hostname`` lowercases)
    if host and not _looks_like_a_host(host):
        found.append(host)  # e.g. slack://TokenA/...: the "host" is a token
    return sorted({p for p in found if len(p) >= 3}, key=len, reverse=True)


def _looks_like_a_host(name: str) -> bool:
    return "." in name or name == "localhost"


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "…")
    return text[:MAX_ERROR_CHARS]


class Webhook:
    """POST the event as JSON, signed with HMAC-SHA256 over ``<timestamp>.<body>``."""

    kind = "webhook"

    def __init__(self, url: str, secret: str, timeout_s: float = 10.0, user_agent: str = "restic-manager"):
        self.url, self._secret, self.timeout_s, self.user_agent = url, secret.encode(), timeout_s, user_agent
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        self.label = (
            f"{parts.scheme}://{host}{port}/…"
            if parts.path.strip("/") or parts.query
            else f"{parts.scheme}://{host}{port}/"
        )
        self._secrets = [*_secret_parts(url), secret]

    def signature(self, timestamp: str, body: bytes) -> str:
        return "sha256=" + hmac.new(self._secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()

    def send(self, event: dict, now: dt.datetime) -> None:
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(int(now.replace(tzinfo=dt.UTC).timestamp()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self.user_agent,
            "X-RM-Event": event["event"],
            "X-RM-Delivery": event["id"],
            "X-RM-Timestamp": timestamp,
            "X-RM-Signature": self.signature(timestamp, body),
        }
        import requests  # here: a command-line process builds the notifier but never sends

        try:
            r = requests.post(self.url, data=body, headers=headers, timeout=self.timeout_s, allow_redirects=False)
        except requests.RequestException as e:
            raise DeliveryError(scrub(f"{type(e).__name__}: {e}", self._secrets)) from None
        if not 200 <= r.status_code < 300:
            raise DeliveryError(scrub(f"HTTP {r.status_code}: {r.text[:100]}", self._secrets))


class AppriseUrl:
    """One Apprise URL (Slack, Teams, e-mail, ntfy, …): the event's title and text."""

    kind = "apprise"

    def __init__(self, url: str, timeout_s: float = 10.0, throttle_s: float | None = None):
        """``throttle_s`` overrides Apprise's own pause between two sends to one service (tests: 0)."""
        import apprise

        self._plugin = apprise.Apprise.instantiate(url)
        if self._plugin is None:
            raise ValueError("not a URL Apprise knows")
        if throttle_s is not None:
            self._plugin.request_rate_per_sec = throttle_s
        self.timeout_s = timeout_s
        self._secrets = _secret_parts(url)
        private = urlsplit(self._plugin.url(privacy=True))
        host = private.hostname or ""
        if host in self._secrets:
            host = "…"
        port = f":{private.port}" if private.port else ""
        self.label = f"{self._plugin.service_name} ({private.scheme}://{host}{port}/…)"

    def send(self, event: dict, now: dt.datetime) -> None:
        import apprise

        notify_type = {
            "failure": apprise.NotifyType.FAILURE,
            "warning": apprise.NotifyType.WARNING,
            "success": apprise.NotifyType.SUCCESS,
        }.get(event.get("level"), apprise.NotifyType.INFO)
        with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as output:
            ok = self._plugin.notify(body=event["text"], title=event["title"], notify_type=notify_type)
            messages = output.getvalue().strip()
        if not ok:
            last = messages.splitlines()[-1] if messages else "Apprise reported a failure"
            raise DeliveryError(scrub(last, self._secrets))


# --- the notifier ------------------------------------------------------------------------------


@dataclass
class DeliveryState:
    """What one destination did last; shown on the settings page (no secrets)."""

    kind: str
    destination: str
    sent: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_attempt_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None
    last_failure_at: dt.datetime | None = None
    last_error: str | None = None
    last_event: str | None = None

    @property
    def failing(self) -> bool:
        """The last delivery (after its retries) failed."""
        return self.last_failure_at is not None and (
            self.last_success_at is None or self.last_failure_at >= self.last_success_at
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "destination": self.destination,
            "sent": self.sent,
            "failed": self.failed,
            "consecutive_failures": self.consecutive_failures,
            "last_attempt_at": isoformat(self.last_attempt_at),
            "last_success_at": isoformat(self.last_success_at),
            "last_failure_at": isoformat(self.last_failure_at),
            "last_error": self.last_error,
            "last_event": self.last_event,
            "failing": self.failing,
        }


@dataclass
class _Target:
    dest: Any
    state: DeliveryState = field(init=False)

    def __post_init__(self):
        self.state = DeliveryState(kind=self.dest.kind, destination=self.dest.label)


_STOP = object()


class Notifier:
    """A bounded queue and the one thread that drains it into every destination.

    ``now`` is the clock (naive UTC), ``sleep`` the pause between attempts (default: a wait that
    :meth:`stop` interrupts); tests inject both. An event is tried ``attempts`` times per
    destination, ``backoff_s`` × 2ⁿ apart (at most :data:`MAX_BACKOFF_S`).
    """

    def __init__(
        self,
        destinations: list,
        now: Callable[[], dt.datetime],
        *,
        attempts: int = 5,
        backoff_s: float = 2.0,
        queue_size: int = 1000,
        sleep: Callable[[float], Any] | None = None,
    ):
        self._targets = [_Target(d) for d in destinations]
        self.now = now
        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    @property
    def configured(self) -> bool:
        return bool(self._targets)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, event: dict) -> bool:
        """Queue ``event`` for every destination without blocking; False if dropped."""
        if not self._targets:
            return False
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            log.warning("notification queue full: dropped %s %s", event.get("event"), event.get("title"))
            return False
        return True

    def status(self) -> list[DeliveryState]:
        with self._lock:
            return [DeliveryState(**vars(t.state)) for t in self._targets]

    def to_dict(self) -> dict:
        """The notifier and each destination's last delivery, as ``GET /api/notifications`` serves it."""
        return {
            "running": self.running,
            "pending": self.pending(),
            "dropped": self.dropped,
            "destinations": [s.to_dict() for s in self.status()],
        }

    def start(self) -> None:
        if self._thread is not None or not self._targets:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (an event in its backoff gives up); events still queued are dropped."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass  # the thread sees the flag after its current event
        thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            event = self._queue.get()
            if event is _STOP:
                return
            try:
                self.deliver(event)
            except Exception:  # noqa: BLE001 - top of a long-running loop: log and go on
                log.exception("notifier: delivering %s failed", event.get("event"))

    def drain(self) -> int:
        """Deliver every queued event in this thread (the loop's work, for tests and one-shots)."""
        n = 0
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return n
            if event is not _STOP:
                self.deliver(event)
                n += 1

    def deliver(self, event: dict) -> None:
        """Send ``event`` to each destination, retrying each one with backoff."""
        for target in self._targets:
            self._deliver_one(target, event)

    def _deliver_one(self, target: _Target, event: dict) -> bool:
        error = "not attempted"
        for attempt in range(self.attempts):
            if attempt:
                if self._sleep(min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))) is True:
                    break  # stop() during the backoff
            now = self.now()
            with self._lock:
                target.state.last_attempt_at = now
            try:
                target.dest.send(event, now)
            except DeliveryError as e:
                error = str(e)
                label = target.dest.label
                log.info("notification %s to %s: attempt %d failed: %s", event["event"], label, attempt + 1, error)
                continue
            with self._lock:
                s = target.state
                s.sent += 1
                s.consecutive_failures = 0
                s.last_success_at, s.last_event = self.now(), event["event"]
            return True
        with self._lock:
            s = target.state
            s.failed += 1
            s.consecutive_failures += 1
            s.last_failure_at, s.last_error, s.last_event = self.now(), error, event["event"]
        log.warning(
            "notification %s to %s failed after %d attempt(s): %s",
            event["event"],
            target.dest.label,
            self.attempts,
            error,
        )
        return False


# --- wiring ------------------------------------------------------------------------------------


def destinations(config) -> list:
    """The destinations the configuration names (``RM_NOTIFY_URLS``, ``RM_WEBHOOK_URL``)."""
    timeout = float(config["NOTIFY_TIMEOUT_S"])
    out: list = [AppriseUrl(u, timeout) for u in config.get("NOTIFY_URLS") or []]
    if config.get("WEBHOOK_URL"):
        agent = f"restic-manager/{config.get('SERVER_VERSION') or 'dev'}"
        out.append(Webhook(config["WEBHOOK_URL"], config["WEBHOOK_SECRET"], timeout, agent))
    return out


def init_app(app: Flask) -> None:
    """Build the app's notifier (not started: ``serve``/``demo`` start it) and subscribe it."""
    rt = runtime(app)
    config = app.config
    rt.notifier = Notifier(
        destinations(config),
        lambda: rt.clock.now(),
        attempts=config["NOTIFY_ATTEMPTS"],
        backoff_s=config["NOTIFY_BACKOFF_S"],
        queue_size=config["NOTIFY_QUEUE"],
    )
    public_url = config.get("PUBLIC_URL")
    # Through ``rt.notifier`` at call time: tests (and a restart of the thread) may replace it.
    rt.alert_raised.subscribe(lambda alert: rt.notifier.submit(alert_event(alert, public_url, rt.clock.now())))
    rt.fleet_finished.subscribe(lambda summary: rt.notifier.submit(fleet_event(summary, public_url, rt.clock.now())))


def send_test(actor: str) -> int:
    """Queue a test notification to every destination, audited; return how many destinations."""
    rt = runtime()
    notifier = rt.notifier
    if not notifier.configured:
        raise Refusal(
            409, "no_notification_destinations", "No destination is configured (RM_NOTIFY_URLS, RM_WEBHOOK_URL)."
        )
    destinations = [s.destination for s in notifier.status()]
    if not notifier.submit(probe_event(actor, current_app.config.get("PUBLIC_URL"), rt.clock.now())):
        raise Refusal(503, "notification_queue_full", "The notification queue is full; the test was not queued.")
    AuditEvent.record(actor, "notifications.test_sent", "notifications", destinations=destinations)
    db.session.commit()
    return len(destinations)
