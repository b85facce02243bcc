"""Trust on the update path (issue 9, items 1, 3 and 4), through a real server and real agents.

The agents talk to the server through :class:`~tests.support.frameproxy.FrameProxy`, a
man-in-the-middle that records every frame and injects frames of its own: a captured
``command.update`` is replayed byte for byte to the same agent, to the same agent while the job
still runs, and into another host's link. Revoking or deleting a host is done during a download
the server throttles (``RM_DOWNLOAD_RATE_KIB``), so it lands mid-body.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.frameproxy import FrameProxy
from tests.support.live import AgentProcess
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

A, B = "1.0.0", "2.0.0"


class Fleet:
    """The live fleet (server process, real agents) with a frame proxy in front of the agent plane."""

    def __init__(self, live_fleet, names, **server_env):
        self.live = live_fleet.seed(names)
        self.ids, self.tokens = live_fleet.host_ids, live_fleet.tokens
        self.server = live_fleet.start_server(**server_env)
        self.proxy = live_fleet.add(FrameProxy(self.server.agent_port).start())
        self.api = live_fleet.api()
        self.agents = [live_fleet.start_agent(token, url=self.proxy.ws_url) for token in self.tokens]
        for host_id in self.ids:
            wait_until(lambda h=host_id: self.online_at(h, A), 30, what=f"host {host_id} online at {A}")

    def online_at(self, host_id, version):
        h = self.api.host(host_id)
        return h["online"] and h["agent_version"] == version

    def job(self, job_id):
        return self.api.get_json(f"/api/jobs/{job_id}")["job"]

    def actions(self, job_id):
        events = self.api.get_json("/api/audit?limit=200")["events"]
        return [e["action"] for e in reversed(events) if e["details"].get("job_id") == job_id]

    def update(self, i) -> str:
        r = self.api.post_json(f"/api/hosts/{self.ids[i]}/update")
        assert r.status_code == 202, r.text
        return r.json()["job"]["id"]

    def command_frame(self, i, job_id) -> str:
        """The exact ``command.update`` text the server sent to agent ``i`` for ``job_id``."""

        def find():
            for link in self.proxy.links_for(self.tokens[i]):
                for text in link.down:
                    env = json.loads(text)
                    if env["type"] == "command.update" and env["data"]["job_id"] == job_id:
                        return text
            return None

        return self.proxy.wait(find, 10, f"command.update for job {job_id}")

    def ended(self, job_id, timeout=30):
        return wait_until(
            lambda: (j := self.job(job_id))["status"] != "running" and j, timeout, 0.05, f"job {job_id} to end"
        )

    def round_trip(self, i):
        """Ping agent ``i`` through the server: every frame the agent got before it is handled."""
        r = self.api.post_json(f"/api/hosts/{self.ids[i]}/ping")
        assert r.status_code == 200, r.text

    def up_frames(self, i, type_, job_id):
        return [
            env
            for link in self.proxy.links_for(self.tokens[i])
            for env in link.envelopes("up", type_)
            if env["data"].get("job_id") == job_id
        ]


@pytest.fixture
def fleet(live_fleet):
    def make(names=("trust-1",), **server_env):
        return Fleet(live_fleet, list(names), **server_env)

    return make


def release_bytes(f: Fleet) -> bytes:
    with open(os.path.join(f.server.instance_dir, "releases", f"restic-manager-agent-{B}.pyz"), "rb") as fh:
        return fh.read()


# --------------------------------------------------------------------------- item 1: replays


def test_a_replayed_command_of_a_finished_job_is_ignored_and_old_is_kept(fleet):
    f = fleet()
    ag = f.agents[0]
    a_bytes = ag.program_bytes()
    job_id = f.update(0)
    assert f.ended(job_id)["status"] == "succeeded"
    wait_until(lambda: f.online_at(f.ids[0], B), 20, what="the agent online at B")
    frame = f.command_frame(0, job_id)
    assert f.proxy.downloads == 1

    # The attacker replays the captured frame to the updated agent; its download would be cut.
    f.proxy.set_mode("cut")
    f.proxy.live_link(f.tokens[0]).inject(frame)
    wait_until(lambda: f"job {job_id}" in ag.log() and "already ran" in ag.log(), 10, what="the replay logged")
    f.round_trip(0)
    assert f.proxy.downloads == 1, "the replay started a download"
    assert ag.program_bytes() == release_bytes(f)
    with open(ag.program + ".old", "rb") as fh:
        assert fh.read() == a_bytes, ".old no longer holds the program to roll back to"
    assert f.up_frames(0, "update.result", job_id) == []

    # A fresh hello (the link breaks) must not turn the long-succeeded job into a failure.
    f.proxy.set_mode("pass")
    before = len(f.proxy.links_for(f.tokens[0]))
    f.proxy.live_link(f.tokens[0]).drop()
    f.proxy.wait(lambda: len(f.proxy.links_for(f.tokens[0])) > before, 15, "the agent to reconnect")
    f.proxy.live_link(f.tokens[0], 15)
    f.round_trip(0)
    job = f.job(job_id)
    assert (job["status"], job["error"]) == ("succeeded", None)
    assert f.api.open_alerts() == []
    assert "host.update_failed" not in f.actions(job_id)


def test_a_duplicate_command_while_the_job_runs_does_not_fail_it(fleet):
    f = fleet(RM_DOWNLOAD_RATE_KIB="64")
    job_id = f.update(0)
    frame = f.command_frame(0, job_id)
    f.proxy.wait(lambda: f.up_frames(0, "update.progress", job_id), 10, "the download to start")
    f.proxy.live_link(f.tokens[0]).inject(frame)  # mid-download
    job = f.ended(job_id)
    assert (job["status"], job["error"]) == ("succeeded", None)
    assert f.up_frames(0, "update.result", job_id) == []
    assert f.proxy.downloads == 1
    assert f.api.open_alerts() == []


def test_a_command_injected_into_another_hosts_link_is_refused(fleet):
    f = fleet(("trust-1", "trust-2"))
    victim = f.agents[1]
    victim_bytes = victim.program_bytes()
    job_id = f.update(0)
    frame = f.command_frame(0, job_id)
    assert f.ended(job_id)["status"] == "succeeded"
    downloads = f.proxy.downloads

    link = f.proxy.live_link(f.tokens[1])
    link.inject(frame)
    cmd_id = json.loads(frame)["id"]
    err = f.proxy.wait(
        lambda: [e for e in link.envelopes("up", "error") if e["data"].get("ref") == cmd_id], 10, "the refusal"
    )[0]
    assert err["data"]["code"] == "wrong_host", err
    f.round_trip(1)
    assert f.proxy.downloads == downloads, "the other host downloaded the update"
    assert victim.program_bytes() == victim_bytes
    assert not os.path.exists(victim.program + ".old")
    assert f.online_at(f.ids[1], A)
    assert f.api.jobs(f.ids[1]) == []


# --------------------------------------------------------------------------- items 3 and 4


def _mid_download(f: Fleet, i: int, job_id: str) -> None:
    f.proxy.wait(lambda: f.up_frames(i, "update.progress", job_id), 10, "the download to start")
    assert f.job(job_id)["status"] == "running"


def _download_failed(ag: AgentProcess, job_id: str) -> None:
    wait_until(lambda: f"update job {job_id} failed" in ag.log(), 15, 0.05, "the agent's download to break off")


def test_revoking_a_host_during_its_download_cuts_it_and_fails_the_job_at_once(fleet):
    # The job's timeout made 600 s, over the module's 120 s guard: the job can only end within the
    # test by the revoke itself (the agent's link is cut too, so it cannot report a failure).
    f = fleet(RM_DOWNLOAD_RATE_KIB="8", RM_UPDATE_TIMEOUT="600")
    ag = f.agents[0]
    a_bytes = ag.program_bytes()
    job_id = f.update(0)
    _mid_download(f, 0, job_id)

    assert f.api.post_json(f"/api/hosts/{f.ids[0]}/revoke").status_code == 200
    job = f.ended(job_id, timeout=60)
    assert job["status"] == "failed"
    assert "host token revoked" in job["error"], job["error"]
    _download_failed(ag, job_id)
    assert ag.program_bytes() == a_bytes
    assert not os.path.exists(ag.program + ".new")
    assert f.actions(job_id)[-1] == "host.update_failed"


def test_deleting_a_host_during_its_rollout_download_keeps_the_job_cancelled_and_halts_the_rollout(fleet):
    f = fleet(("trust-1", "trust-2"), RM_DOWNLOAD_RATE_KIB="8")
    ag = f.agents[0]
    a_bytes = ag.program_bytes()
    r = f.api.post_json("/api/fleet/update", {"host_ids": f.ids})
    assert r.status_code == 201, r.text
    fid = r.json()["fleet_update"]["id"]
    job_id = wait_until(lambda: f.api.fleet_update(fid)["hosts"][0]["job_id"], 10, what="dispatch")
    _mid_download(f, 0, job_id)

    assert f.api.http.delete(f"{f.api.base}/api/hosts/{f.ids[0]}", timeout=10).status_code == 204
    job = f.job(job_id)  # the job outlives its host
    assert job["status"] == "cancelled" and job["error"] == "host deleted", job
    assert job["host_name"] == "trust-1" and job["host_id"] is None
    assert f.actions(job_id)[-2:] == ["host.update_dispatched", "host.update_cancelled"]

    fu = wait_until(lambda: f.api.fleet_update_ended(fid), 10, what="the rollout to settle")
    assert fu["status"] == "halted" and fu["total"] == 2, fu
    row = fu["hosts"][0]
    assert (row["name"], row["status"], row["error"], row["job_id"]) == ("trust-1", "cancelled", "host deleted", job_id)
    assert "host deleted" in fu["halt_reason"]
    assert fu["hosts"][1]["status"] == "pending" and fu["hosts"][1]["job_id"] is None

    _download_failed(ag, job_id)  # the running download was cut: the agent never swaps
    assert ag.program_bytes() == a_bytes
    assert not os.path.exists(ag.program + ".new")
