"""/metrics: who may scrape it, its own address (RM_METRICS_ADDR), and the rate-limit counter."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.extensions import db
from app.models import ApiToken
from tests.conftest import SERVER_VERSION
from tests.support.live import LiveClient, LiveServer
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_need_an_api_token_of_any_role_or_a_session(app, cast):
    _, viewer = ApiToken.issue(cast.viewer, "prometheus")
    db.session.commit()
    with LiveServer(app) as live:
        url = f"{live.admin_url}/metrics"
        r = requests.get(url, timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert requests.get(url, headers={"Authorization": "Bearer rmt_wrong"}, timeout=5).status_code == 401
        r = requests.get(url, headers={"Authorization": f"Bearer {viewer}"}, timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        got = samples(r.text)
        # A starting server marks every host offline until its agent says hello.
        behind = ("rm_hosts", (("agent_version", "1.0.0"), ("state", "offline"), ("version_state", "behind")))
        current = ("rm_hosts", (("agent_version", SERVER_VERSION), ("state", "offline"), ("version_state", "current")))
        assert (got[behind], got[current], got[("rm_agents_connected", ())]) == (1, 2, 0)
        session = LiveClient(live.admin_url).login("viewer", "viewer-pass-123")
        assert session.http.get(url, timeout=5).status_code == 200


def test_metrics_on_their_own_address_need_no_token_and_stop_with_the_server(app, cast):
    app.config["METRICS_ADDR"] = ("127.0.0.1", 0)
    with LiveServer(app) as live:
        port = live.servers.metrics_port
        r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200 and "rm_agents_connected 0.0" in r.text
        assert (
            requests.get(f"{live.admin_url}/metrics", timeout=5).status_code == 401
        )  # the admin plane's still wants one
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_frames_refused_by_the_rate_limit_are_counted(app, cast):
    app.config.update(AGENT_MSG_RATE=1.0, AGENT_MSG_BURST=2.0)
    with LiveServer(app) as live:
        agent = ScriptedAgent(live.agent_ws_url, cast.host_behind_token, "1.0.0")
        agent.connect()
        try:
            for _ in range(10):
                agent.send("heartbeat")
            metric = ("rm_agent_frames_rate_limited_total", ())
            from app.metrics import exposition

            wait_until(lambda: samples(exposition(app).decode()).get(metric, 0) >= 5, 10, what="refusals counted")
        finally:
            agent.disconnect()
