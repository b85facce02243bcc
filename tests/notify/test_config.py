"""Notification settings go through the strict parsers: a bad value stops start-up naming the variable."""

from __future__ import annotations

import pytest

from app import create_app
from app.config import ConfigError, from_env
from app.runtime import runtime


@pytest.mark.parametrize(
    "var,value,fragment",
    [
        ("RM_WEBHOOK_URL", "ftp://example.com/hook", "RM_WEBHOOK_URL: expected an http:// or https:// URL with a host"),
        ("RM_WEBHOOK_URL", "https:///nohost", "RM_WEBHOOK_URL: expected an http:// or https:// URL"),
        ("RM_WEBHOOK_URL", "http://example.com:99999/", "RM_WEBHOOK_URL: not a valid URL"),
        ("RM_PUBLIC_URL", "rm.example.com", "RM_PUBLIC_URL: expected an http:// or https:// URL"),
        ("RM_WEBHOOK_SECRET", "short", "RM_WEBHOOK_SECRET: must be at least 16 characters"),
        ("RM_NOTIFY_URLS", "slack://A/B/C bogus://x", "RM_NOTIFY_URLS: URL #2 (scheme 'bogus') is not one Apprise"),
        ("RM_NOTIFY_URLS", "not a url", "RM_NOTIFY_URLS: URL #1 (scheme '(none)')"),
        ("RM_NOTIFY_ATTEMPTS", "0", "RM_NOTIFY_ATTEMPTS='0': must be at least 1"),
        ("RM_NOTIFY_BACKOFF_S", "soon", "RM_NOTIFY_BACKOFF_S='soon': expected a number"),
        ("RM_NOTIFY_QUEUE", "0", "RM_NOTIFY_QUEUE='0': must be at least 1"),
    ],
)
def test_a_bad_notification_setting_names_the_variable(var, value, fragment):
    with pytest.raises(ConfigError) as e:
        from_env({var: value})
    assert fragment in str(e.value)


def test_a_bad_webhook_url_does_not_echo_its_path():
    with pytest.raises(ConfigError) as e:
        from_env({"RM_WEBHOOK_URL": "gopher://hooks.example.com/T0KEN"})
    assert "T0KEN" not in str(e.value)


def test_notification_settings_parse():
    cfg = from_env(
        {
            "RM_NOTIFY_URLS": "slack://TokenA/TokenB/TokenC, ntfys://ntfy.example.com/rm-alerts\nmailto://mail.example.com?from=rm@example.com&to=ops@example.com",
            "RM_WEBHOOK_URL": "https://hooks.example.com/rm",
            "RM_WEBHOOK_SECRET": "0123456789abcdef0123",
            "RM_PUBLIC_URL": "https://rm.example.com/",
            "RM_NOTIFY_ATTEMPTS": "3",
            "RM_NOTIFY_BACKOFF_S": "0.5",
        }
    )
    assert cfg["NOTIFY_URLS"] == [
        "slack://TokenA/TokenB/TokenC",
        "ntfys://ntfy.example.com/rm-alerts",
        "mailto://mail.example.com?from=rm@example.com&to=ops@example.com",
    ]
    assert cfg["PUBLIC_URL"] == "https://rm.example.com"
    assert cfg["WEBHOOK_URL"] == "https://hooks.example.com/rm"
    assert (cfg["NOTIFY_ATTEMPTS"], cfg["NOTIFY_BACKOFF_S"]) == (3, 0.5)


def test_a_webhook_without_a_secret_stops_start_up(tmp_path):
    with pytest.raises(ConfigError, match="RM_WEBHOOK_URL is set but RM_WEBHOOK_SECRET is not"):
        create_app(
            {"INSTANCE_PATH": str(tmp_path), "SECRET_KEY": "x"}, environ={"RM_WEBHOOK_URL": "https://h.example/"}
        )


def test_the_app_builds_one_destination_per_url_and_does_not_start_sending(tmp_path):
    app = create_app(
        {"INSTANCE_PATH": str(tmp_path), "SECRET_KEY": "x"},
        environ={
            "RM_NOTIFY_URLS": "ntfys://ntfy.example.com/rm-alerts json://hooks.example.com/x",
            "RM_WEBHOOK_URL": "https://hooks.example.com/rm/T0KEN",
            "RM_WEBHOOK_SECRET": "0123456789abcdef0123",
        },
    )
    notifier = runtime(app).notifier
    assert [s.destination for s in notifier.status()] == [
        "ntfy (ntfys://ntfy.example.com/…)",
        "JSON (json://hooks.example.com/…)",
        "https://hooks.example.com/…",
    ]
    assert not notifier.running  # only serve and demo start the thread
