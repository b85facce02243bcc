"""The runtime object: one per app, its waker, its announcements; and no import cycle in app/."""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from app.extensions import db
from app.models import Job
from app.runtime import Announcement, Runtime, Waker, runtime
from app.updates import watcher

ROOT = Path(__file__).resolve().parents[2]


def test_each_app_has_its_own_runtime_reached_one_way(app):
    rt = runtime()
    assert isinstance(rt, Runtime) and rt is runtime(app)
    assert rt.scheduler is None and rt.started_at is None  # only ``serve`` starts and stamps them
    assert len(rt.connections) == 0 and len(rt.inflight) == 0


def test_a_wake_during_a_run_makes_the_waker_run_again():
    waker = Waker("job", lambda: None)
    calls = []

    def step():
        calls.append(len(calls))
        if len(calls) == 1:
            waker.wake()  # arrives while the step runs: must not be lost

    waker.run(step)
    assert calls == [0, 1]


def test_the_waker_wakes_only_for_the_host_it_waits_for():
    waker = Waker("job", lambda: None)
    waker.waiting_for = frozenset({7})
    waker.wake_for(8)
    runs = []
    waker.run(lambda: runs.append(1))
    assert runs == [1]  # one run, no pending wake-up from host 8
    waker.wake_for(7)
    assert waker._pending


def test_the_waker_nudges_a_running_scheduler_job():
    class Scheduler:
        running = True
        timezone = dt.UTC

        def __init__(self):
            self.moved = []

        def modify_job(self, job_id, next_run_time):
            self.moved.append(job_id)

    sched = Scheduler()
    Waker("fleet_tick", lambda: sched).wake()
    assert sched.moved == ["fleet_tick"]


def test_announcements_call_subscribers_in_order():
    seen = []
    ann = Announcement("x")
    ann.subscribe(lambda v: seen.append(("a", v)))
    ann.subscribe(lambda v: seen.append(("b", v)))
    ann.publish(1)
    assert seen == [("a", 1), ("b", 1)]


def test_the_watcher_announces_a_job_ended_after_its_commit(app, cast):
    job = Job(host_id=cast.host_behind.id, kind="update", status="running", params={"version": "2.0.0"})
    db.session.add(job)
    db.session.commit()
    seen = []

    def subscriber(job_id):
        with db.engine.connect() as other:  # what any other session sees: committed rows only
            seen.append((job_id, other.scalar(sa.select(Job.status).where(Job.id == job_id))))

    runtime().job_ended.subscribe(subscriber)
    assert watcher.fail_job(job.id, "broken")
    assert seen == [(job.id, "failed")]  # committed before the announcement
    assert not watcher.fail_job(job.id, "again")  # an ended job is not announced twice
    assert len(seen) == 1


def _imports(path: Path, mod: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def _cycles(package: str) -> list[list[str]]:
    files = {}
    for p in (ROOT / package).rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = p
    graph = {
        m: {t for t in _imports(p, m) if t in files and t != m and not m.startswith(t + ".")} for m, p in files.items()
    }
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_the_server_package_has_no_import_cycle():
    """Lazy imports inside functions count: they hide a cycle, they do not remove it."""
    assert _cycles("app") == []


def test_the_waited_for_hosts_travel_between_instances_as_a_list_or_a_star():
    from app.cluster import WAITING_LIST_MAX, decode_waiting, encode_waiting

    assert encode_waiting(frozenset()) == "0" and decode_waiting("0") == frozenset()
    assert encode_waiting(frozenset({9, 3, 7})) == "3,7,9" and decode_waiting("3,7,9") == {3, 7, 9}
    many = frozenset(range(1, WAITING_LIST_MAX + 2))
    assert encode_waiting(many) == "*" and decode_waiting("*") is None  # None: forward every hello


def test_a_wake_during_a_run_does_not_nudge_the_scheduler_but_is_not_lost():
    nudges = []

    class Scheduler:
        running = True
        timezone = dt.UTC

        def modify_job(self, job_id, next_run_time):
            nudges.append(job_id)

    waker = Waker("job", lambda: Scheduler())
    calls = []

    def step():
        calls.append(1)
        if len(calls) < 3:
            waker.wake()  # e.g. 50 jobs of a wave ending while the tick runs

    waker.run(step)
    assert calls == [1, 1, 1] and nudges == []
    waker.wake()  # not running now: the scheduler job is moved to now
    assert nudges == ["job"]
