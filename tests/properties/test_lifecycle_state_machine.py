"""A hypothesis state machine over the real update lifecycle: jobs, the watcher and fleet rollouts.

The rules call the real functions (``dispatch.dispatch_update``, ``watcher.sweep_timeouts``,
``fleet.start``/``cancel``/``tick``) in this thread, the way the scheduler and the views do, while
scripted agents on real sockets drive ``watcher.on_hello``/``on_progress``/``on_result`` through the
real agent link of a live server. Time is a FakeClock (``runtime(app).clock``) and the
scheduler is off, so nothing moves unless a rule moves it; every agent move ends with a ping/pong
round trip, so the server has handled it before the next step (no sleeps, no races).

After every step the invariants are read back from the database; after a ``tick`` the rollout rows
must agree with their jobs; at the end of each run a drain (clock past every deadline, sweep, tick
until quiet) must leave every job and every rollout terminal.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from agent import protocol
from app.errors import Refusal
from app.extensions import db
from app.models import (
    FLEET_HOST_STATUSES,
    FLEET_STATUSES,
    JOB_STATUSES,
    Alert,
    AuditEvent,
    FleetUpdate,
    FleetUpdateHost,
    Host,
    Job,
)
from app.runtime import runtime
from app.updates import dispatch, fleet, watcher
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

UPDATE_TIMEOUT = 90.0
OFFLINE_GRACE = 30.0
LIVE_CONFIG = {"UPDATE_TIMEOUT": UPDATE_TIMEOUT, "FLEET_OFFLINE_GRACE_S": OFFLINE_GRACE}
N_HOSTS = 3
MAX_TICKS = 50

#: How watcher._correct_success words a success the agent later reported rolled back.
CORRECTED = "rolled back after its hello at the target"
TERMINAL_ROW = {"succeeded", "failed", "skipped", "cancelled"}


def fresh():
    """Start a new unit of work, as a scheduler job or a request would: nothing cached."""
    db.session.remove()


class Rig:
    """The module's hosts and their scripted agents on the live server."""

    def __init__(self, app, live):
        self.app, self.live = app, live
        self.clock = runtime(app).clock
        self.registry = runtime(app).connections
        self.hosts: list[tuple[int, str]] = []
        for i in range(N_HOSTS):
            host, token = Host.enrol(f"sm-{i}")
            db.session.commit()
            self.hosts.append((host.id, token))
        self.agents: dict[int, ScriptedAgent | None] = {i: None for i in range(N_HOSTS)}
        #: job ids of the command.update frames each agent received, oldest first
        self.commands: dict[int, list[str]] = {i: [] for i in range(N_HOSTS)}

    def host_id(self, i: int) -> int:
        return self.hosts[i][0]

    def online(self, i: int) -> bool:
        return self.agents[i] is not None

    def connect(self, i: int, version: str, last_update: dict | None = None) -> None:
        assert self.agents[i] is None
        agent = ScriptedAgent(self.live.agent_ws_url, self.hosts[i][1], version)
        agent.connect(last_update=last_update)
        self.agents[i] = agent
        self.sync(i)  # the hello is reconciled (watcher.on_hello) only after the welcome is sent

    def disconnect(self, i: int) -> None:
        agent, self.agents[i] = self.agents[i], None
        agent.disconnect()
        host_id = self.host_id(i)

        def offline():
            fresh()
            return not self.registry.is_connected(host_id) and not db.session.get(Host, host_id).connected

        wait_until(offline, timeout=10, interval=0.002, what=f"host {i} offline")

    def send(self, i: int, type_: str, **data) -> None:
        self.agents[i].send(type_, **data)
        self.sync(i)

    def sync(self, i: int) -> None:
        """Round-trip a ping: every frame sent before it has been handled, every frame the server
        wrote before the pong has arrived. Note the update commands on the way."""
        agent = self.agents[i]
        ref = protocol.new_id()
        agent.ws.send(protocol.encode("ping", {}, ref))
        while True:
            env = agent.inbox.get(timeout=10)
            if env.type == "pong" and env.data["ref"] == ref:
                return
            assert env.type == "command.update", f"unexpected {env.type} from the server: {env.data}"
            self.commands[i].append(env.data["job_id"])

    def sync_all(self) -> None:
        for i in range(N_HOSTS):
            if self.online(i):
                self.sync(i)

    def reset(self) -> int:
        """Back to three online hosts behind the server, nothing running; return the audit high-water mark."""
        for i in range(N_HOSTS):
            if self.online(i):
                self.disconnect(i)
            self.commands[i] = []
        fresh()
        for model in (FleetUpdateHost, FleetUpdate, Job, Alert):  # the audit log is append-only: keep it
            db.session.execute(sa.delete(model))
        db.session.execute(sa.update(Host).values(agent_version=OLD_VERSION))
        db.session.commit()
        runtime(self.app).inflight.reload()
        mark = db.session.scalar(sa.select(sa.func.max(AuditEvent.id))) or 0
        fresh()
        for i in range(N_HOSTS):
            self.connect(i, OLD_VERSION)
        return mark

    def close(self) -> None:
        for i in range(N_HOSTS):
            if self.online(i):
                self.disconnect(i)


#: Terminal states reached over the whole run, to show (and check) the machine is not vacuous.
OUTCOMES: Counter[str] = Counter()

hosts = st.integers(0, N_HOSTS - 1)
which_job = st.sampled_from(["current", "oldest", "unknown"])


class Lifecycle(RuleBasedStateMachine):
    fleet_env: Rig  # set by the test before the machine runs

    def __init__(self):
        super().__init__()
        self.env = self.fleet_env
        self.audit_mark = self.env.reset()
        self.version = {i: OLD_VERSION for i in range(N_HOSTS)}  # what each agent last said in hello
        self.job_seen: dict[str, str] = {}
        self.fleet_seen: dict[int, str] = {}
        self.row_seen: dict[int, str] = {}

    # --- helpers

    def job_ref(self, i: int, which: str) -> str:
        sent = self.env.commands[i]
        if which == "unknown" or not sent:
            return str(uuid.uuid4())
        return sent[-1] if which == "current" else sent[0]

    def drive(self) -> None:
        """Tick until the rollout state machine has nothing more to do right now."""
        for _ in range(MAX_TICKS):
            fresh()
            if not fleet.tick():
                break
        else:
            raise AssertionError(f"fleet.tick() still changing things after {MAX_TICKS} ticks")
        fresh()
        self.env.sync_all()  # commands the ticks dispatched have reached their agents

    # --- rules: the operator and the scheduler

    @rule(i=hosts)
    def dispatch_update(self, i):
        fresh()
        try:
            dispatch.dispatch_update(self.env.host_id(i), "admin")
        except Refusal:
            db.session.rollback()
        fresh()
        if self.env.online(i):
            self.env.sync(i)

    @rule(subset=st.none() | st.lists(hosts, min_size=1, max_size=N_HOSTS, unique=True))
    def start_rollout(self, subset):
        fresh()
        ids = None if subset is None else [self.env.host_id(i) for i in subset]
        try:
            fleet.start("admin", ids)
        except Refusal as r:
            assert r.code in ("fleet_update_running", "no_hosts_to_update"), r.code
        fresh()

    @rule()
    def cancel_rollout(self):
        fresh()
        fu = fleet.running()
        target = fu.id if fu is not None else db.session.scalar(sa.select(sa.func.max(FleetUpdate.id)))
        if target is not None:
            try:
                fleet.cancel(target, "admin")
            except Refusal as r:
                assert fu is None and r.code == "fleet_update_not_running", r.code
        fresh()

    @rule()
    def tick(self):
        self.drive()
        self.check_rollouts_agree_with_jobs()

    @rule(seconds=st.sampled_from([1.0, OFFLINE_GRACE + 1, UPDATE_TIMEOUT - 1, UPDATE_TIMEOUT + 1, 3 * UPDATE_TIMEOUT]))
    def time_passes_and_the_sweep_runs(self, seconds):
        self.env.clock.advance(seconds)
        fresh()
        watcher.sweep_timeouts()
        fresh()

    # --- rules: the agents

    def online_hosts(self) -> list[int]:
        return [i for i in range(N_HOSTS) if self.env.online(i)]

    def commanded_hosts(self) -> list[int]:
        return [i for i in self.online_hosts() if self.env.commands[i]]

    @precondition(lambda self: self.online_hosts())
    @rule(data=st.data(), phase=st.sampled_from(protocol.UPDATE_PHASES), which=which_job)
    def agent_reports_progress(self, data, phase, which):
        i = data.draw(st.sampled_from(self.online_hosts()), label="host")
        ref = self.job_ref(i, which)
        self.env.send(i, "update.progress", job_id=ref, phase=phase, bytes_done=10, bytes_total=10)

    @precondition(lambda self: self.online_hosts())
    @rule(data=st.data(), ok=st.booleans(), which=which_job)
    def agent_reports_result(self, data, ok, which):
        i = data.draw(st.sampled_from(self.online_hosts()), label="host")
        ref = self.job_ref(i, which)
        self.env.send(i, "update.result", job_id=ref, ok=ok, error="" if ok else "sha256 mismatch")

    @rule(
        i=hosts,
        at_new=st.booleans(),
        outcome=st.sampled_from([None, "swapped", "failed", "rolled_back"]),
        which=which_job,
    )
    def agent_reconnects(self, i, at_new, outcome, which):
        if self.env.online(i):
            self.env.disconnect(i)
        version = SERVER_VERSION if at_new else OLD_VERSION
        last = None
        if outcome is not None:
            last = {
                "job_id": self.job_ref(i, which),
                "outcome": outcome,
                "error": None if outcome == "swapped" else "new program never reached the server",
                "version": SERVER_VERSION,
                "from_version": OLD_VERSION,
            }
        self.env.connect(i, version, last)
        self.version[i] = version

    @precondition(lambda self: self.commanded_hosts())
    @rule(data=st.data())
    def agent_completes_its_update(self, data):
        """A well-behaved agent: reports restarting, swaps, comes back at the target."""
        self.complete_update(data.draw(st.sampled_from(self.commanded_hosts()), label="host"))

    def complete_update(self, i: int) -> None:
        job_id = self.env.commands[i][-1]
        self.env.send(i, "update.progress", job_id=job_id, phase="restarting", bytes_done=1, bytes_total=1)
        self.env.disconnect(i)
        last = {"job_id": job_id, "outcome": "swapped", "error": None, "version": SERVER_VERSION}
        self.env.connect(i, SERVER_VERSION, last)
        self.version[i] = SERVER_VERSION

    @precondition(lambda self: self.online_hosts())
    @rule(data=st.data())
    def agent_goes_offline(self, data):
        self.env.disconnect(data.draw(st.sampled_from(self.online_hosts()), label="host"))

    # --- invariants, read from the database after every step

    def check_all(self) -> None:
        """Every invariant at once (for the scripted run, which calls rules by hand)."""
        self.at_most_one_rollout_runs()
        self.jobs_are_well_formed_and_terminal_states_are_final()
        self.the_in_flight_cache_matches_the_jobs_table()
        self.every_job_is_dispatched_and_ended_exactly_once_in_the_audit_log()
        self.rollouts_and_rows_are_well_formed_and_terminal_states_are_final()

    def rows(self, model, *where):
        fresh()
        return db.session.scalars(sa.select(model).where(*where)).all()

    @invariant()
    def at_most_one_rollout_runs(self):
        assert len(self.rows(FleetUpdate, FleetUpdate.status == "running")) <= 1

    @invariant()
    def jobs_are_well_formed_and_terminal_states_are_final(self):
        running_per_host: dict[int, int] = {}
        for job in self.rows(Job):
            assert job.kind == "update" and job.status in JOB_STATUSES, (job.kind, job.status)
            if job.status == "running":
                running_per_host[job.host_id] = running_per_host.get(job.host_id, 0) + 1
                assert job.finished_at is None
            else:
                assert job.finished_at is not None, job.id
            if job.status == "failed":
                assert job.error, f"job {job.id} failed without a reason"
            before = self.job_seen.get(job.id)
            if before == "succeeded" and job.status == "failed":
                # The one way back from success: the agent later reports it rolled back
                # (watcher._correct_success). Nothing else may reopen a terminal job.
                assert job.error.startswith(CORRECTED), job.error
            else:
                assert before in (None, "running", job.status), f"job {job.id} went {before} -> {job.status}"
            if job.status == "succeeded" and before != "succeeded":
                # Success only ever comes from a hello at the target, which is this step's hello.
                i = next(k for k, (hid, _) in enumerate(self.env.hosts) if hid == job.host_id)
                host = db.session.get(Host, job.host_id)
                assert host.agent_version == job.target_version == self.version[i] == SERVER_VERSION
            self.job_seen[job.id] = job.status
        assert all(n == 1 for n in running_per_host.values()), running_per_host

    @invariant()
    def the_in_flight_cache_matches_the_jobs_table(self):
        running = {j.host_id: j.id for j in self.rows(Job, Job.status == "running")}
        inflight = runtime(self.env.app).inflight
        for host_id, _ in self.env.hosts:
            entry = inflight.get(host_id)
            assert (entry.job_id if entry else None) == running.get(host_id), host_id

    @invariant()
    def every_job_is_dispatched_and_ended_exactly_once_in_the_audit_log(self):
        events = self.rows(
            AuditEvent,
            AuditEvent.id > self.audit_mark,
            AuditEvent.action.in_(("host.update_dispatched", "host.update_succeeded", "host.update_failed")),
        )
        counts: Counter[tuple[str, str]] = Counter((e.action, e.details["job_id"]) for e in events)
        for job in self.rows(Job):
            dispatched = counts["host.update_dispatched", job.id]
            succeeded, failed = counts["host.update_succeeded", job.id], counts["host.update_failed", job.id]
            assert dispatched == 1, f"job {job.id} dispatched {dispatched} times"
            want = {
                "running": [(0, 0)],
                "succeeded": [(1, 0)],
                # failed outright, or a success corrected after a reported rollback
                "failed": [(0, 1), (1, 1)] if (job.error or "").startswith(CORRECTED) else [(0, 1)],
            }[job.status]
            assert (succeeded, failed) in want, f"job {job.id} ({job.status}): {succeeded} successes, {failed} failures"

    @invariant()
    def rollouts_and_rows_are_well_formed_and_terminal_states_are_final(self):
        for fu in self.rows(FleetUpdate):
            assert fu.status in FLEET_STATUSES
            before = self.fleet_seen.get(fu.id)
            if before == "succeeded" and fu.status == "halted":
                # A finished rollout whose host was rolled back afterwards (fleet.correct_host_row).
                assert CORRECTED in (fu.halt_reason or ""), fu.halt_reason
            else:
                assert before in (None, "running", fu.status), f"rollout {fu.id} went {before} -> {fu.status}"
            self.fleet_seen[fu.id] = fu.status
            rows = list(fu.hosts)
            assert sum(r.status == "running" for r in rows) <= 1, "one host at a time"
            if fu.status == "succeeded":
                assert all(r.status in ("succeeded", "skipped") for r in rows)
            if fu.status == "halted":
                assert fu.halt_reason and any(r.status == "failed" for r in rows)
            if fu.status == "cancelled":
                assert not any(r.status == "pending" for r in rows)
            for r in rows:
                assert r.status in FLEET_HOST_STATUSES
                assert r.status != "running" or r.job_id is not None, "a running row has its job"
                row_before = self.row_seen.get(r.id)
                if row_before == "succeeded" and r.status == "failed":
                    # The one way back: its job was corrected after a reported rollback.
                    assert (r.error or "").startswith(CORRECTED), r.error
                elif row_before in TERMINAL_ROW:
                    assert r.status == row_before, f"row {r.id} went {row_before} -> {r.status}"
                self.row_seen[r.id] = r.status

    def check_rollouts_agree_with_jobs(self):
        """After the ticks: every row with a job says what its job says; a running rollout waits on one host."""
        for fu in self.rows(FleetUpdate):
            rows = list(fu.hosts)
            for r in rows:
                if r.job_id is None:
                    continue
                job = db.session.get(Job, r.job_id)
                assert r.status == job.status, f"row {r.id} is {r.status} but its job is {job.status}"
            if fu.status == "running":
                assert not any(r.status == "failed" for r in rows), "a failed host halts the rollout"
                if not any(r.status == "running" for r in rows):
                    # Nothing in flight: the rollout must be waiting for its next host to come back
                    # online (within RM_FLEET_OFFLINE_GRACE_S); anything else the tick would have done.
                    nxt = next((r for r in rows if r.status == "pending"), None)
                    assert nxt is not None, [r.status for r in rows]
                    assert not self.env.registry.is_connected(nxt.host_id), "an online host was not dispatched"

    # --- the end of every run: drain, then everything is terminal

    def teardown(self):
        try:
            # Tick first: a job that ended since the last tick (its wake-up is the scheduler's, which
            # is off here) still has its row to settle. Each round ends at least one host's turn.
            for _ in range(N_HOSTS + 3):
                self.drive()
                fresh()
                busy = db.session.scalar(sa.select(sa.func.count(Job.id)).where(Job.status == "running"))
                if not busy and fleet.running() is None:
                    break
                self.env.clock.advance(max(UPDATE_TIMEOUT, OFFLINE_GRACE) + 1)
                fresh()
                watcher.sweep_timeouts()
            assert self.rows(Job, Job.status == "running") == [], "a job is still running after the drain"
            assert self.rows(FleetUpdate, FleetUpdate.status == "running") == [], "a rollout is still running"
            assert self.rows(FleetUpdateHost, FleetUpdateHost.status == "running") == [], "a row is still running"
            self.check_rollouts_agree_with_jobs()
            self.jobs_are_well_formed_and_terminal_states_are_final()
            self.every_job_is_dispatched_and_ended_exactly_once_in_the_audit_log()
            for job in self.rows(Job):
                OUTCOMES[f"job {job.status}"] += 1
            for fu in self.rows(FleetUpdate):
                OUTCOMES[f"rollout {fu.status}"] += 1
        finally:
            fresh()


@pytest.fixture(scope="module")
def fleet_env(module_app, module_live):
    env = Rig(module_app, module_live)
    yield env
    env.close()


def test_every_lifecycle_path_ends_terminal_with_at_most_one_rollout(fleet_env):
    Lifecycle.fleet_env = fleet_env
    OUTCOMES.clear()
    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=50,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    print("lifecycle outcomes:", dict(sorted(OUTCOMES.items())))


def test_a_scripted_run_reaches_each_terminal_state_under_the_same_invariants(fleet_env):
    """The random runs above usually reach every ending; this one always does."""
    Lifecycle.fleet_env = fleet_env
    m = Lifecycle()

    def status(model, key):
        fresh()
        return db.session.get(model, key).status

    def step(fn, *args, **kwargs):
        fn(*args, **kwargs)
        m.check_all()

    def latest_rollout():
        fresh()
        return db.session.scalar(sa.select(sa.func.max(FleetUpdate.id)))

    # A rollout over two hosts succeeds, one host at a time.
    step(m.start_rollout, [0, 1])
    step(m.tick)
    step(m.complete_update, 0)
    step(m.tick)
    step(m.complete_update, 1)
    step(m.tick)
    assert status(FleetUpdate, latest_rollout()) == "succeeded"
    # A single-host update that fails on the agent's word.
    step(m.dispatch_update, 2)
    step(m.env.send, 2, "update.result", job_id=m.env.commands[2][-1], ok=False, error="no space left")
    assert status(Job, m.env.commands[2][-1]) == "failed"
    # A rollout halted by a timeout, then one cancelled mid-flight, then a drain.
    step(m.agent_reconnects, 0, False, None, "unknown")
    step(m.agent_reconnects, 1, False, None, "unknown")
    step(m.start_rollout, [0, 1])
    step(m.tick)
    step(m.time_passes_and_the_sweep_runs, UPDATE_TIMEOUT + 1)
    step(m.tick)
    assert status(FleetUpdate, latest_rollout()) == "halted"
    step(m.start_rollout, [1, 2])
    step(m.tick)
    step(m.cancel_rollout)
    assert status(FleetUpdate, latest_rollout()) == "cancelled"
    m.teardown()
