import datetime as dt

import pytest

from tests.support.receivers import WebhookReceiver

SECRET = "whsec-0123456789abcdef"
PUBLIC_URL = "https://rm.example.com"


def epoch(t: dt.datetime) -> float:
    return t.replace(tzinfo=dt.UTC).timestamp()


@pytest.fixture
def receiver(clock):
    """A webhook receiver whose clock is the test's (so the server's timestamps are fresh)."""
    with WebhookReceiver(SECRET, now=lambda: epoch(clock.now())) as rx:
        yield rx


@pytest.fixture
def app_config(app_config, receiver):
    return {**app_config, "WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "PUBLIC_URL": PUBLIC_URL}
