"""Delivery to real receivers: the signed webhook, e-mail through Apprise, a destination that is down."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from app.notify import AppriseUrl, Notifier, Webhook, fleet_event, probe_event
from tests.support.receivers import Mailbox, WebhookReceiver, free_port, verify
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)

SECRET = "whsec-0123456789abcdef"
NOW = dt.datetime(2026, 3, 1, 8, 0, 0)


def epoch(t: dt.datetime) -> float:
    return t.replace(tzinfo=dt.UTC).timestamp()


class Sleeps:
    """The notifier's injected sleep: records each pause, never waits."""

    def __init__(self):
        self.pauses: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


def notifier(*dests, sleeps=None, attempts=4, backoff_s=2.0, now=lambda: NOW):
    return Notifier(list(dests), now, attempts=attempts, backoff_s=backoff_s, sleep=sleeps or Sleeps())


def test_the_webhook_call_is_signed_over_timestamp_and_body_and_the_receiver_accepts_it():
    with WebhookReceiver(SECRET, now=lambda: epoch(NOW) + 5) as rx:
        n = notifier(Webhook(rx.url, SECRET))
        ev = probe_event("admin", "https://rm.example.com", NOW)
        assert n.submit(ev)
        assert n.drain() == 1
        (call,) = rx.wait_for(lambda calls: len(calls) == 1)
    h = call["headers"]
    assert h["X-RM-Timestamp"] == str(int(epoch(NOW)))
    assert h["X-RM-Event"] == "test" and h["X-RM-Delivery"] == ev["id"]
    assert h["X-RM-Signature"].startswith("sha256=") and len(h["X-RM-Signature"]) == 7 + 64
    assert call["json"]["url"] == "https://rm.example.com/settings/notifications"
    assert rx.rejected == []
    (state,) = n.status()
    assert state.sent == 1 and not state.failing and state.last_success_at == NOW


def test_a_receiver_refuses_a_stale_timestamp_a_wrong_secret_and_a_changed_body():
    hook = Webhook("http://127.0.0.1:9/", SECRET)
    body = b'{"event":"test"}'
    ts = str(int(epoch(NOW)))
    headers = {"X-RM-Timestamp": ts, "X-RM-Signature": hook.signature(ts, body)}
    assert verify(SECRET, headers, body, epoch(NOW) + 299)
    assert not verify(SECRET, headers, body, epoch(NOW) + 301)  # replayed 5 minutes later
    assert not verify("another-secret-of-16", headers, body, epoch(NOW))
    assert not verify(SECRET, headers, b'{"event":"tesT"}', epoch(NOW))
    assert not verify(SECRET, {**headers, "X-RM-Timestamp": str(int(ts) + 1)}, body, epoch(NOW))


def test_a_stale_call_is_rejected_by_the_real_receiver_and_counts_as_a_failed_delivery():
    # The server's clock is 10 minutes behind the receiver's: every call looks replayed.
    with WebhookReceiver(SECRET, now=lambda: epoch(NOW) + 600) as rx:
        n = notifier(Webhook(rx.url, SECRET), attempts=2)
        n.submit(probe_event("admin", None, NOW))
        n.drain()
    assert len(rx.rejected) == 2 and rx.accepted == []
    (state,) = n.status()
    assert state.failing and state.last_error.startswith("HTTP 401")


def test_a_receiver_that_answers_500_then_recovers_gets_the_event_on_the_retry():
    sleeps = Sleeps()
    with WebhookReceiver(SECRET, now=lambda: epoch(NOW), statuses=[500, 503]) as rx:
        n = notifier(Webhook(rx.url, SECRET), sleeps=sleeps)
        n.submit(probe_event("admin", None, NOW))
        n.drain()
        calls = rx.wait_for(lambda c: len(c) == 1)
    assert rx.calls == 3 and sleeps.pauses == [2.0, 4.0]
    assert len({c["headers"]["X-RM-Delivery"] for c in calls}) == 1
    (state,) = n.status()
    assert state.sent == 1 and state.failed == 0 and not state.failing


def test_a_destination_that_is_down_is_retried_with_backoff_then_shows_last_delivery_failed(caplog):
    sleeps = Sleeps()
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/hooks/T0KEN-in-the-path?key=query-secret"
    n = notifier(Webhook(url, SECRET), sleeps=sleeps, attempts=5, backoff_s=1.5)
    n.submit(probe_event("admin", None, NOW))
    n.drain()
    assert sleeps.pauses == [1.5, 3.0, 6.0, 12.0]
    (state,) = n.status()
    assert state.failing and state.failed == 1 and state.consecutive_failures == 1
    assert state.last_failure_at == NOW and state.last_event == "test"
    assert state.destination == f"http://127.0.0.1:{port}/…"
    shown = json.dumps(state.to_dict())
    for secret in ("T0KEN-in-the-path", "query-secret", SECRET):
        assert secret not in shown
    assert "ConnectionError" in state.last_error
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "failed after 5 attempt" in r.message]
    assert len(warnings) == 1 and "T0KEN" not in warnings[0].message


def test_one_destination_down_does_not_keep_the_event_from_the_others():
    with WebhookReceiver(SECRET, now=lambda: epoch(NOW)) as rx:
        down = Webhook(f"http://127.0.0.1:{free_port()}/", SECRET)
        n = notifier(down, Webhook(rx.url, SECRET), attempts=2)
        n.submit(probe_event("admin", None, NOW))
        n.drain()
        rx.wait_for(lambda c: len(c) == 1)
    first, second = n.status()
    assert first.failing and not second.failing and second.sent == 1


def test_the_backoff_is_capped():
    n = notifier(Webhook(f"http://127.0.0.1:{free_port()}/", SECRET), attempts=12, backoff_s=1.0)
    n.submit(probe_event("admin", None, NOW))
    n.drain()
    assert n._sleep.pauses[-1] == 300.0 and n._sleep.pauses[:3] == [1.0, 2.0, 4.0]


def test_the_email_arrives_through_apprises_mailto_at_a_local_smtp_server():
    with Mailbox() as box:
        mail = AppriseUrl(f"mailto://127.0.0.1:{box.port}?from=rm@example.com&to=ops@example.com", timeout_s=5)
        n = notifier(mail)
        summary = {
            "id": 7,
            "status": "halted",
            "target_version": "2.0.0",
            "halt_reason": "host web-3: sha256 mismatch",
            "total": 4,
            "wall_time_s": 95.0,
            "counts": {"succeeded": 2, "failed": 1, "pending": 1},
        }
        n.submit(fleet_event(summary, "https://rm.example.com", NOW))
        n.drain()
        ((envelope, msg),) = box.wait_for(1)
    assert envelope.rcpt_tos == ["ops@example.com"]
    assert "Fleet update 7 to 2.0.0 halted" in msg["Subject"]
    text = msg.get_body(("plain", "html")).get_content()
    assert "2 succeeded, 1 failed, 1 pending (4 hosts) in 1m 35s" in text
    assert "host web-3: sha256 mismatch" in text
    assert "https://rm.example.com/settings/fleet-update/7/report" in text
    (state,) = n.status()
    assert state.sent == 1 and state.destination.startswith("E-Mail (mailto://127.0.0.1")


def test_an_smtp_server_that_is_down_shows_a_failed_delivery_without_the_password():
    port = free_port()
    url = f"mailto://rm:SMTP-PASSWORD-1@127.0.0.1:{port}?from=rm@example.com&to=ops@example.com"
    mail = AppriseUrl(url, throttle_s=0)
    n = notifier(mail, attempts=2)
    n.submit(probe_event("admin", None, NOW))
    n.drain()
    (state,) = n.status()
    assert state.failing and state.last_error == 'Connection error while submitting email to "127.0.0.1"'
    assert "SMTP-PASSWORD-1" not in json.dumps(state.to_dict())


def test_the_notifier_thread_sends_in_the_background_and_stops_promptly():
    with WebhookReceiver(SECRET, now=lambda: epoch(NOW)) as rx:
        n = Notifier([Webhook(rx.url, SECRET)], lambda: NOW, attempts=3, backoff_s=60.0)
        n.start()
        try:
            assert n.running
            n.submit(probe_event("admin", None, NOW))
            rx.wait_for(lambda c: len(c) == 1)
        finally:
            n.stop(timeout=5)
        assert not n.running


def test_stop_interrupts_a_long_backoff():
    n = Notifier([Webhook(f"http://127.0.0.1:{free_port()}/", SECRET)], lambda: NOW, attempts=3, backoff_s=3600.0)
    n.start()
    n.submit(probe_event("admin", None, NOW))
    wait_until(lambda: n.status()[0].last_attempt_at is not None, what="the first attempt (then the backoff)")
    thread = n._thread
    # A join bound far from load noise, and far below the 3,600 s backoff: the thread can only have
    # ended if stop() interrupted the backoff. (n.running is False after any stop(): it forgets the thread.)
    n.stop(timeout=30)
    assert not thread.is_alive() and not n.running


def test_a_full_queue_drops_the_event_with_a_warning_and_never_blocks(caplog):
    n = Notifier([Webhook("http://127.0.0.1:9/", SECRET)], lambda: NOW, queue_size=2)
    assert n.submit(probe_event("a", None, NOW)) and n.submit(probe_event("b", None, NOW))
    assert not n.submit(probe_event("c", None, NOW))
    assert n.dropped == 1 and n.pending() == 2
    assert any("queue full" in r.message for r in caplog.records)


def test_without_destinations_nothing_is_queued():
    n = Notifier([], lambda: NOW)
    assert not n.configured and not n.submit(probe_event("a", None, NOW)) and n.pending() == 0


def test_a_slack_url_shows_no_token_and_its_errors_have_the_tokens_scrubbed():
    from app.notify import _secret_parts, scrub

    url = "slack://TokenAAA/TokenBBB/TokenCCC/#ops"
    slack = AppriseUrl(url)
    for token in ("TokenAAA", "TokenBBB", "TokenCCC"):
        assert token not in slack.label and token.lower() not in slack.label
    assert slack.label.startswith("Slack (slack://")
    error = "POST https://hooks.slack.com/services/TokenAAA/TokenBBB/TokenCCC failed"
    assert scrub(error, _secret_parts(url)) == "POST https://hooks.slack.com/services/…/…/… failed"
