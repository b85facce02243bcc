"""A real update failure reaches people: ``serve`` with a webhook and an e-mail destination, a real agent.

The server process is started with ``RM_WEBHOOK_URL``/``RM_WEBHOOK_SECRET`` pointing at a receiver in
this test (which checks every call's signature and timestamp) and ``RM_NOTIFY_URLS`` with a
``mailto://`` URL at a local aiosmtpd server. A corrupt artifact fails the agent's update; the new
``update_failed`` alert arrives at both, sent by the server's own notifier thread.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_update_smoke import admin_when_online, corrupt, press_update, release_path, terminal_job
from tests.support.receivers import Mailbox, WebhookReceiver
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SECRET = "e2e-webhook-secret-0123456789"


def test_a_failed_update_is_sent_to_the_signed_webhook_and_by_e_mail(live_fleet):
    fleet = live_fleet.seed(["smoke-1"])
    host_id, token = fleet.host_ids[0], fleet.tokens[0]
    with WebhookReceiver(SECRET) as rx, Mailbox() as box:
        srv = fleet.start_server(
            RM_WEBHOOK_URL=rx.url,
            RM_WEBHOOK_SECRET=SECRET,
            RM_NOTIFY_URLS=f"mailto://127.0.0.1:{box.port}?from=rm@example.com&to=ops@example.com",
            RM_PUBLIC_URL="https://rm.example.com",
        )
        fleet.start_agent(token)
        admin = admin_when_online(srv, host_id)
        corrupt(release_path(srv))
        press_update(admin, host_id)
        assert terminal_job(admin, host_id)["status"] == "failed"

        (call,) = rx.wait_for(lambda calls: len(calls) >= 1, timeout=30)
        ((_, mail),) = box.wait_for(1, timeout=30)

        def page_with_both_delivered():
            # The receivers have the message a moment before the notifier records the delivery.
            page = admin.http.get(f"{admin.base}/settings/notifications", timeout=10).text
            return page if page.count("delivered") == 2 else None

        page = wait_until(page_with_both_delivered, 10, what="both deliveries on the settings page")

    assert rx.rejected == []  # the signature and timestamp checked out
    ev = call["json"]
    assert call["headers"]["X-RM-Event"] == "alert.raised"
    assert ev["alert"]["kind"] == "update_failed" and ev["alert"]["host"] == "smoke-1"
    assert "sha256" in ev["text"] and ev["url"] == f"https://rm.example.com/hosts/{host_id}"
    assert mail["Subject"] == "Agent update failed: smoke-1"
    assert "sha256" in mail.get_body(("plain", "html")).get_content()
    assert "last delivery failed" not in page
    assert "rm-secret-path" not in page and SECRET not in page
