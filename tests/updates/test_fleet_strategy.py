"""Rollout strategies: parsing (counts, percentages, typed 400s), waves, and the engine tick by tick
against scripted agents on real sockets, with an injected clock (soaks, graces and deadlines)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.errors import Refusal
from app.extensions import db
from app.models import AuditEvent, FleetUpdate, Host, Job
from app.updates import fleet, strategy
from app.updates.strategy import Strategy, assign_waves
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)


# --- parsing and waves (no database) -------------------------------------------------------------


def test_the_defaults_are_the_seed_behaviour():
    s = Strategy.from_body({})
    assert s == Strategy()
    assert (s.in_flight(200), s.failure_budget(200), s.offline) == (1, 0, "halt")
    assert assign_waves(4, s) == [0, 1, 2, 3]  # one host per wave


@pytest.mark.parametrize(
    "amount,total,minimum,count",
    [
        ("5", 200, 1, 5),
        ("10%", 200, 1, 20),
        ("10%", 5, 1, 1),
        ("1%", 30, 1, 1),
        ("5%", 200, 0, 10),
        ("5%", 30, 0, 1),
        ("5%", 10, 0, 0),
        ("100%", 7, 1, 7),
        ("0", 9, 0, 0),
    ],
)
def test_counts_and_percentages_resolve_against_the_selected_hosts(amount, total, minimum, count):
    assert strategy.resolve(amount, total, minimum) == count


@pytest.mark.parametrize(
    "body,field",
    [
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": "0%"}, "max_in_flight"),
        ({"max_in_flight": "ten"}, "max_in_flight"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"max_failures": "101%"}, "max_failures"),
        ({"max_failures": -1}, "max_failures"),
        ({"max_failures": 1.5}, "max_failures"),
        ({"canary": -1}, "canary"),
        ({"canary": "x"}, "canary"),
        ({"max_in_flight": " 5"}, "max_in_flight"),
        ({"max_in_flight": "05"}, "max_in_flight"),
        ({"max_in_flight": 5.0}, "max_in_flight"),
        ({"canary": "1"}, "canary"),
        ({"wave_soak_s": -3}, "wave_soak_s"),
        ({"wave_soak_s": "5"}, "wave_soak_s"),
        ({"wave_soak_s": float("nan")}, "wave_soak_s"),
        ({"offline": "pray"}, "offline"),
        ({"offline": "wait", "offline_deadline_s": [1]}, "offline_deadline_s"),
    ],
)
def test_a_bad_strategy_field_is_a_typed_400_naming_it(body, field):
    with pytest.raises(Refusal) as e:
        Strategy.from_body(body)
    assert (e.value.status, e.value.code) == (400, "invalid_strategy")
    assert e.value.message.startswith(f"{field}:")


def test_fields_are_stored_canonically():
    s = Strategy.from_body(
        {
            "canary": 2,
            "canary_soak_s": 30,
            "max_in_flight": "10%",
            "max_failures": 3,
            "wave_soak_s": 5,
            "offline": "wait",
        }
    )
    assert s.to_dict() == {
        "canary": 2,
        "canary_soak_s": 30.0,
        "max_in_flight": "10%",
        "max_failures": "3",
        "wave_soak_s": 5.0,
        "offline": "wait",
        "offline_deadline_s": strategy.DEFAULT_OFFLINE_DEADLINE_S,
    }


def test_waves_are_the_canary_then_groups_of_the_in_flight_limit():
    s = Strategy(canary=1, max_in_flight="3")
    assert assign_waves(8, s) == [0, 1, 1, 1, 2, 2, 2, 3]
    assert (s.soak_before(0), s.soak_before(1), s.soak_before(2)) == (0.0, 0.0, 0.0)
    s = Strategy(canary=2, canary_soak_s=60, max_in_flight="50%", wave_soak_s=5)
    assert assign_waves(6, s) == [0, 0, 1, 1, 1, 2]
    assert (s.soak_before(1), s.soak_before(2)) == (60.0, 5.0)
    assert assign_waves(1, Strategy(canary=5)) == [0]  # a canary larger than the fleet is the fleet
    # Fields that mean nothing in their context are dropped, not refused.
    assert Strategy.from_body({"canary_soak_s": 10, "offline_deadline_s": 60}) == Strategy()


# --- the engine against scripted agents --------------------------------------------------------


def drive():
    db.session.rollback()
    while fleet.tick():
        pass


def rollout(fid):
    db.session.rollback()
    return db.session.get(FleetUpdate, fid).to_dict()


def statuses(fid):
    return {h["name"]: h["status"] for h in rollout(fid)["hosts"]}


def actions():
    db.session.rollback()
    return db.session.scalars(
        sa.select(AuditEvent.action).where(AuditEvent.action.like("fleet.%")).order_by(AuditEvent.id)
    ).all()


def job_status(job_id):
    db.session.rollback()
    return db.session.get(Job, job_id).status


@pytest.fixture
def behind(cast, agent_for):
    """``make(n)``: n more behind hosts (b-1 … b-n) with scripted agents connected; by name they
    sort before the cast's app-1, which has no agent."""

    def make(n, connect=True):
        out = []
        for i in range(1, n + 1):
            host, token = Host.enrol(f"b-{i}")
            host.agent_version, host.capabilities = OLD_VERSION, ["update"]
            db.session.commit()
            out.append((host, agent_for(host, token, OLD_VERSION) if connect else token))
        return out

    return make


def succeed(agent):
    cmd = agent.expect("command.update")
    job = cmd.data["job_id"]
    agent.send("update.progress", job_id=job, phase="restarting", bytes_done=1, bytes_total=1)
    agent.disconnect()
    agent.connect(version=SERVER_VERSION, last_update={"job_id": job, "outcome": "swapped", "error": None})
    wait_until(lambda: job_status(job) == "succeeded", what=f"job {job} succeeded")
    return job


def fail(agent, error="disk full"):
    cmd = agent.expect("command.update")
    job = cmd.data["job_id"]
    agent.send("update.result", job_id=job, ok=False, error=error)
    wait_until(lambda: job_status(job) == "failed", what=f"job {job} failed")
    return job


def ids(hosts):
    return [h.id for h, _ in hosts]


def test_max_in_flight_is_a_sliding_window_across_waves(behind):
    hosts = behind(3)
    fid = fleet.start("admin", ids(hosts), Strategy(max_in_flight="2")).id
    drive()
    assert statuses(fid) == {"b-1": "running", "b-2": "running", "b-3": "pending"}
    assert [h["wave"] for h in rollout(fid)["hosts"]] == [0, 0, 1]
    succeed(hosts[0][1])
    drive()
    assert statuses(fid)["b-3"] == "running"  # a slot freed: b-3 starts while b-2 still runs
    succeed(hosts[1][1])
    succeed(hosts[2][1])
    drive()
    r = rollout(fid)
    assert r["status"] == "succeeded" and r["max_in_flight"] == "2"
    assert all(h["from_version"] == OLD_VERSION for h in r["hosts"])


def test_a_wave_soak_makes_each_wave_a_barrier(behind, clock):
    hosts = behind(3)
    fid = fleet.start("admin", ids(hosts), Strategy(max_in_flight="2", wave_soak_s=30)).id
    drive()
    succeed(hosts[0][1])
    drive()
    assert statuses(fid)["b-3"] == "pending"  # the wave is a barrier: b-2 still runs
    assert hosts[2][1].inbox.empty()
    succeed(hosts[1][1])
    drive()
    assert statuses(fid)["b-3"] == "pending" and rollout(fid)["hold_until"] is not None  # soaking
    clock.advance(31)
    drive()
    assert statuses(fid)["b-3"] == "running"
    succeed(hosts[2][1])
    drive()
    assert rollout(fid)["status"] == "succeeded"


def test_a_host_waiting_out_its_grace_holds_back_the_hosts_after_it(cast, behind, clock):
    hosts = behind(1)
    fid = fleet.start("admin", [cast.host_behind.id, hosts[0][0].id], Strategy(max_in_flight="2")).id
    drive()
    assert statuses(fid) == {"app-1": "pending", "b-1": "pending"}  # as the sequential rollout waits
    clock.advance(31)
    drive()
    r = rollout(fid)
    assert r["status"] == "halted" and statuses(fid) == {"app-1": "failed", "b-1": "pending"}


def test_a_canary_failure_within_the_budget_lets_the_next_wave_go(behind):
    hosts = behind(3)
    fid = fleet.start("admin", ids(hosts), Strategy(canary=1, max_in_flight="2", max_failures="1")).id
    drive()
    assert statuses(fid) == {"b-1": "running", "b-2": "pending", "b-3": "pending"}
    fail(hosts[0][1])
    drive()
    # One failure is within the budget of 1: the next wave goes.
    assert statuses(fid) == {"b-1": "failed", "b-2": "running", "b-3": "running"}


def test_a_failed_canary_with_the_default_budget_halts_before_any_other_host(behind):
    hosts = behind(3)
    fid = fleet.start("admin", ids(hosts), Strategy(canary=1, canary_soak_s=60, max_in_flight="2")).id
    drive()
    fail(hosts[0][1])
    drive()
    r = rollout(fid)
    assert r["status"] == "halted" and r["halt_reason"] == "host b-1: disk full"
    assert statuses(fid) == {"b-1": "failed", "b-2": "pending", "b-3": "pending"}
    assert hosts[1][1].inbox.empty() and hosts[2][1].inbox.empty()
    assert actions()[-1] == "fleet.update_halted"


def test_the_canary_soak_holds_the_next_wave_until_the_clock_passes_it(behind, clock):
    hosts = behind(2)
    fid = fleet.start("admin", ids(hosts), Strategy(canary=1, canary_soak_s=60, max_in_flight="5")).id
    drive()
    succeed(hosts[0][1])
    drive()
    r = rollout(fid)
    assert r["hold_until"] is not None and statuses(fid)["b-2"] == "pending"
    clock.advance(59)
    drive()
    assert statuses(fid)["b-2"] == "pending"
    clock.advance(2)
    drive()
    assert statuses(fid)["b-2"] == "running" and rollout(fid)["hold_until"] is None
    succeed(hosts[1][1])
    drive()
    assert rollout(fid)["status"] == "succeeded"


def test_the_failure_budget_halts_once_exceeded_and_in_flight_jobs_still_settle(behind):
    hosts = behind(4)
    fid = fleet.start("admin", ids(hosts), Strategy(max_in_flight="4", max_failures="25%")).id  # 1 of 4
    drive()
    assert set(statuses(fid).values()) == {"running"}
    fail(hosts[0][1])
    drive()
    assert rollout(fid)["status"] == "running"  # 1 failure: within the budget
    fail(hosts[1][1], "bad checksum")
    drive()
    r = rollout(fid)
    assert r["status"] == "halted"
    assert r["halt_reason"].startswith("2 hosts failed, over the failure budget of 1 (max_failures 25%)")
    succeed(hosts[2][1])  # in flight at the halt: it finishes and its row records it
    drive()
    assert statuses(fid) == {"b-1": "failed", "b-2": "failed", "b-3": "succeeded", "b-4": "running"}


def test_pause_stops_new_dispatch_and_resume_goes_on(behind):
    hosts = behind(2)
    fid = fleet.start("admin", ids(hosts)).id
    drive()
    fleet.pause(fid, "admin")
    with pytest.raises(Refusal) as e:
        fleet.pause(fid, "admin")
    assert (e.value.status, e.value.code) == (409, "fleet_update_paused")
    succeed(hosts[0][1])
    drive()
    r = rollout(fid)
    assert r["status"] == "running" and r["paused_by"] == "admin" and statuses(fid)["b-2"] == "pending"
    fleet.resume(fid, "admin")
    drive()
    assert statuses(fid)["b-2"] == "running"
    with pytest.raises(Refusal) as e:
        fleet.resume(fid, "admin")
    assert e.value.code == "fleet_update_not_paused"
    succeed(hosts[1][1])
    drive()
    assert rollout(fid)["status"] == "succeeded"
    assert actions() == [
        "fleet.update_started",
        "fleet.update_paused",
        "fleet.update_resumed",
        "fleet.update_succeeded",
    ]


def test_skipping_a_pending_host_leaves_it_alone(behind):
    hosts = behind(2)
    fid = fleet.start("admin", ids(hosts)).id
    drive()
    with pytest.raises(Refusal) as e:
        fleet.skip_host(fid, hosts[0][0].id, "admin")  # running, not pending
    assert (e.value.status, e.value.code) == (409, "fleet_host_not_pending")
    with pytest.raises(Refusal) as e:
        fleet.skip_host(fid, 999999, "admin")
    assert (e.value.status, e.value.code) == (404, "fleet_host_not_found")
    fleet.skip_host(fid, hosts[1][0].id, "admin")
    succeed(hosts[0][1])
    drive()
    r = rollout(fid)
    assert r["status"] == "succeeded" and statuses(fid) == {"b-1": "succeeded", "b-2": "skipped"}
    assert r["hosts"][1]["error"] == "skipped by admin"
    assert hosts[1][1].inbox.empty()
    assert "fleet.host_skipped" in actions()


def test_retry_takes_just_the_failed_and_skipped_hosts_with_the_same_strategy(behind):
    hosts = behind(4)
    s = Strategy(max_in_flight="2", max_failures="1")
    fid = fleet.start("admin", ids(hosts), s).id
    drive()
    fleet.skip_host(fid, hosts[3][0].id, "admin")
    fail(hosts[0][1])
    succeed(hosts[1][1])
    drive()
    succeed(hosts[2][1])
    drive()
    assert rollout(fid)["status"] == "succeeded" and rollout(fid)["failed"] == 1
    with pytest.raises(Refusal) as e:
        fleet.retry(424242, "admin")
    assert e.value.status == 404
    retry = fleet.retry(fid, "admin")
    r = rollout(retry.id)
    assert (r["kind"], r["parent_id"]) == ("retry", fid)
    assert [h["name"] for h in r["hosts"]] == ["b-1", "b-4"]
    assert Strategy.of(db.session.get(FleetUpdate, retry.id)) == s
    with pytest.raises(Refusal) as e:
        fleet.retry(retry.id, "admin")
    assert (e.value.status, e.value.code) == (409, "fleet_update_running")
    drive()
    succeed(hosts[0][1])
    succeed(hosts[3][1])
    drive()
    assert rollout(retry.id)["status"] == "succeeded"
    with pytest.raises(Refusal) as e:
        fleet.retry(fid, "admin")  # every failed or skipped host has been updated since
    assert (e.value.status, e.value.code) == (422, "no_hosts_to_update")


def test_offline_skip_records_the_host_skipped_after_its_grace_and_goes_on(cast, behind, clock):
    hosts = behind(1)
    fid = fleet.start("admin", [cast.host_behind.id, hosts[0][0].id], Strategy(offline="skip")).id
    drive()
    assert statuses(fid) == {"app-1": "pending", "b-1": "pending"}  # app-1 within its grace
    clock.advance(31)
    drive()
    r = rollout(fid)
    assert statuses(fid) == {"app-1": "skipped", "b-1": "running"}
    assert "offline" in r["hosts"][0]["error"] and "offline=skip" in r["hosts"][0]["error"]


def test_offline_wait_queues_the_host_and_updates_it_when_it_comes_back(cast, behind, agent_for, clock):
    hosts = behind(1)
    fid = fleet.start(
        "admin", [cast.host_behind.id, hosts[0][0].id], Strategy(offline="wait", offline_deadline_s=600)
    ).id
    drive()
    r = rollout(fid)
    assert statuses(fid) == {"app-1": "pending", "b-1": "running"}  # app-1 queued, b-1 goes past it
    assert r["hosts"][0]["waiting_since"] is not None
    assert fleet.offline_waits(db.session.get(FleetUpdate, fid))[cast.host_behind.id]["policy"] == "wait"
    succeed(hosts[0][1])
    drive()
    assert rollout(fid)["status"] == "running"  # waiting for app-1
    clock.advance(300)
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    drive()
    assert statuses(fid)["app-1"] == "running"
    succeed(agent)
    drive()
    assert rollout(fid)["status"] == "succeeded"


def test_offline_wait_skips_a_host_that_misses_its_deadline(cast, behind, clock):
    hosts = behind(1)
    fid = fleet.start(
        "admin", [cast.host_behind.id, hosts[0][0].id], Strategy(offline="wait", offline_deadline_s=120)
    ).id
    drive()
    succeed(hosts[0][1])
    drive()
    clock.advance(121)
    drive()
    r = rollout(fid)
    assert r["status"] == "succeeded" and statuses(fid) == {"app-1": "skipped", "b-1": "succeeded"}
    assert "120 s deadline" in r["hosts"][0]["error"]


def test_the_plan_groups_waves_and_names_the_offline_policy(cast, behind):
    behind(3)
    p = fleet.plan(None, Strategy(canary=1, max_in_flight="2", offline="wait", offline_deadline_s=60)).to_dict()
    assert [(w["wave"], w["canary"], [h["name"] for h in w["hosts"]]) for w in p["waves"]] == [
        (0, True, ["app-1"]),
        (1, False, ["b-1", "b-2"]),
        (2, False, ["b-3"]),
    ]
    assert "offline=wait" in p["waves"][0]["hosts"][0]["note"]  # app-1 has no agent: queued when offline
    assert p["policy"] == "waves" and p["max_in_flight_hosts"] == 2 and p["failure_budget_hosts"] == 0
    # With the default policy the default selection leaves the offline host out, and says why.
    db.session.execute(sa.update(Host).where(Host.id == cast.host_behind.id).values(connected=False))
    db.session.commit()
    p = fleet.plan().to_dict()
    out = {lo["name"]: lo for lo in p["left_out"]}
    assert out["app-1"]["reason"] == "offline" and "offline=halt" in out["app-1"]["detail"]
    assert p["policy"] == "sequential"


# --- the API -----------------------------------------------------------------------------------


def test_the_api_takes_the_strategy_and_returns_it(client, auth, cast, behind):
    hosts = behind(2)
    auth.login()
    r = client.post("/api/fleet/plan", json={"max_in_flight": "nope"})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_strategy"
    assert "max_in_flight" in r.json["error"]["message"]
    body = {"host_ids": ids(hosts), "canary": 1, "max_in_flight": "50%", "max_failures": "1", "offline": "skip"}
    r = client.post("/api/fleet/update", json=body)
    assert r.status_code == 201, r.json
    fu = r.json["fleet_update"]
    assert (fu["canary"], fu["max_in_flight"], fu["max_failures"], fu["offline"]) == (1, "50%", "1", "skip")
    assert [h["wave"] for h in fu["hosts"]] == [0, 1]
    fid = fu["id"]
    assert client.post(f"/api/fleet-updates/{fid}/pause").json["fleet_update"]["paused_by"] == "admin"
    assert client.post(f"/api/fleet-updates/{fid}/pause").status_code == 409
    assert client.post(f"/api/fleet-updates/{fid}/resume").json["fleet_update"]["paused_at"] is None
    r = client.post(f"/api/fleet-updates/{fid}/hosts/{hosts[1][0].id}/skip")
    assert r.status_code == 200 and r.json["fleet_update"]["hosts"][1]["status"] == "skipped"
    assert client.post(f"/api/fleet-updates/{fid}/retry").status_code == 409  # still running
    assert client.post("/api/fleet-updates/424242/pause").status_code == 404
    assert client.post(f"/api/fleet-updates/{fid}/cancel").status_code == 200
    r = client.post(f"/api/fleet-updates/{fid}/retry")
    assert r.status_code == 201 and r.json["fleet_update"]["kind"] == "retry"
    assert [h["name"] for h in r.json["fleet_update"]["hosts"]] == ["b-2"]
