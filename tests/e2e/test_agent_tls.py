"""The agent link over TLS, end to end: a real server process serving its agent plane with a
certificate from the run's own CA (tests/support/pki.py), and a real agent zipapp that pins that
CA (``server_ca``).

The pinned agent connects over wss:// and completes an update whose download runs over https. An
agent shown a certificate it cannot verify (another CA's, or the right CA's for another name: a
man in the middle) logs the verification failure, never connects, never downloads, and keeps
its program.
"""

from __future__ import annotations

import os

import pytest

from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

A, B = "1.0.0", "2.0.0"


@pytest.fixture
def tls_fleet(live_fleet, pki):
    """start(cert pair): a TLS server with that certificate and one agent pinning the test CA."""
    live_fleet.seed(["tls-1"])

    def start(pair):
        server = live_fleet.start_server(RM_AGENT_TLS_CERT=pair.cert, RM_AGENT_TLS_KEY=pair.key)
        assert server.agent_ws_url.startswith("wss://127.0.0.1:")
        agent = live_fleet.start_agent(live_fleet.tokens[0], A, extra_config=f'server_ca = "{pki.ca}"\n')
        return server, agent

    return live_fleet, start


def test_a_pinned_agent_connects_over_wss_and_updates_over_https(tls_fleet, pki):
    fleet, start = tls_fleet
    server, agent = start(pki.server)
    host_id = fleet.host_ids[0]
    admin = fleet.admin()
    wait_until(lambda: admin.host(host_id)["online"], 30, what="the agent online over wss")
    assert f"agents wss://127.0.0.1:{server.agent_port}/ws/agent" in server.log()
    old = agent.program_bytes()

    r = admin.post_json(f"/api/hosts/{host_id}/update")
    assert r.status_code == 202, r.text

    def job_done():
        jobs = admin.jobs(host_id)
        return jobs and jobs[0]["status"] != "running" and jobs[0]

    job = wait_until(job_done, 60, 0.05, "the update job to end")
    assert job["status"] == "succeeded", job
    wait_until(lambda: admin.host(host_id)["agent_version"] == B, 30, what=f"the agent back at {B}")
    with open(os.path.join(server.instance_dir, "releases", f"restic-manager-agent-{B}.pyz"), "rb") as f:
        assert agent.program_bytes() == f.read()  # downloaded over https and swapped in
    with open(agent.program + ".old", "rb") as f:
        assert f.read() == old
    log = agent.log()
    assert f"downloading version {B} from https://127.0.0.1:{server.agent_port}/agent/download/{B}" in log
    assert "certificate" not in log.lower()


@pytest.mark.parametrize("impostor", ["foreign", "wrong_name"])
def test_an_agent_refuses_a_certificate_it_cannot_verify_and_keeps_its_program(tls_fleet, pki, impostor):
    fleet, start = tls_fleet
    server, agent = start(getattr(pki, impostor))
    old = agent.program_bytes()
    why = "unable to get local issuer certificate" if impostor == "foreign" else "IP address mismatch"

    def refused_twice():
        log = agent.log()
        return log.count("the server's certificate is not trusted") >= 2 and why in log and log

    log = wait_until(refused_twice, 30, 0.1, "the agent to refuse the certificate (and retry)")
    assert f"the pinned CA in {pki.ca}" in log  # it says what it trusted
    assert "connected to" not in log and "downloading" not in log
    # The server saw the agent abort the handshake; no request, so no token, ever reached it.
    assert "TLS handshake with 127.0.0.1 failed" in server.log()
    assert "GET /ws/agent" not in server.log()
    admin = fleet.admin()
    assert admin.host(fleet.host_ids[0])["online"] is False
    assert admin.post_json(f"/api/hosts/{fleet.host_ids[0]}/update").status_code != 202
    assert agent.program_bytes() == old
    assert not os.path.exists(agent.program + ".new") and not os.path.exists(agent.program + ".old")
