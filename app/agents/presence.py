"""Who is online, written to the database in batches by one writer thread.

Every agent socket changes its host's row three ways: its ``hello`` (what the agent says about
itself, ``connected``), its heartbeats (``last_seen``) and its end (offline). Written by each
connection's own thread that was one commit per hello and per heartbeat, thousands of threads
queueing for SQLite's one write lock (and for the pool's connections while they waited): a
reconnect storm of 2,000 agents spent most of its time there (docs/capacity.md). Here one
thread writes instead:

* **hellos** are *group-committed*: a connection queues its hello and waits (bounded) until the
  writer has committed it, so ``connected`` is in the database before the agent is welcomed;
  the writer takes every hello queued meanwhile into the same transaction, and ``hello_hooks``
  run in it with each hello's context (the update watcher ends the jobs they succeed there);
* **offline** marks are queued and written with the next transaction (nobody waits for them);
* **heartbeats** only :meth:`Presence.note` the host in memory; every ``interval_s`` one
  statement writes ``last_seen`` for all hosts noted since the last flush;
* **other agent reports** that need no answer (an update's progress, app/updates/watcher.py) are
  queued (:meth:`Presence.queue`) with the function that writes a batch of them; the writer calls it
  inside its next transaction, before the hellos, with every item queued meanwhile (nobody waits
  for them; a hello queued after a report is committed with it or after it).

``connected`` is decided when the writer writes, from the live registry: a host is written online
only while it has a socket here (and a token: a revoke that commits first is never undone), and
offline only while it has none. A reconnect that overtakes its own disconnect therefore never
leaves the host offline, and a late heartbeat never brings a closed one back.

With several instances (PostgreSQL, ``app/cluster.py``), every row written online also names
this instance (``hosts.instance_id``), and a row is written offline only while it still names
this instance: a newer socket on a peer is the peer's. ``flush_hooks`` run inside every interval
flush's transaction, with the session and the time written, for a process's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Flask

from ..extensions import db
from ..models import Host
from ..runtime import runtime
from ..timeutil import utcnow

log = logging.getLogger(__name__)

#: How long a failed write waits before the writer tries again.
RETRY_S = 1.0
#: Ids per ``IN (...)`` list, well under SQLite's 32,766 bound parameters.
MAX_IDS_PER_STATEMENT = 10_000
#: Under a stream of hellos (one written less than ``BUSY_WINDOW_S`` ago), the writer waits this
#: long after a batch's first hello before it writes, so that the batch gathers the hellos arriving
#: meanwhile: a reconnect storm wrote batches of one or two hellos, each costing its reads, its
#: statements and its commit (most of a worker's CPU at 10,000 agents). A lone hello is written
#: at once.
HELLO_LINGER_S = 0.1
BUSY_WINDOW_S = 1.0
#: A batch this large is written without waiting out the linger.
MAX_LINGER_BATCH = 1000
#: The hello columns the agent fills (``protocol`` bounds every value).
HELLO_COLUMNS = ("agent_version", "os", "arch", "hostname", "python", "platform", "capabilities", "boot_id")


def hello_values(data: dict) -> dict[str, Any]:
    """The host columns a ``hello`` sets."""
    values = {c: data.get(c) for c in HELLO_COLUMNS}
    values["platform"] = values["platform"] or None
    return values


@dataclasses.dataclass
class _Hello:
    host_id: int
    values: dict[str, Any]
    context: Any = None  # handed to the hello hooks
    at: dt.datetime = dataclasses.field(default_factory=utcnow)  # when it arrived
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    ok: bool = False


@dataclasses.dataclass
class FlushResult:
    """What one flush wrote (for tests and the benchmark)."""

    hellos: int = 0
    offline: int = 0
    heartbeats: int = 0
    queued: int = 0  # items of queued batch writes
    statements: int = 0


class Presence:
    """The agent plane's writes of ``hosts.connected`` and ``hosts.last_seen`` (see the module).

    :param live: ``host_id -> bool``: does the host have a socket on this process now; default:
        the runtime's connection registry at the time of asking (a cluster replaces it at start).
    :param interval_s: how often noted heartbeats are written; None: from the app's config when
        the writer starts (:func:`flush_interval`).
    :param clock: monotonic seconds, injectable.
    """

    def __init__(
        self,
        live: Callable[[int], bool] | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.live = live or _socket_here
        self._configured_interval = interval_s
        self.interval_s = interval_s or 1.0
        self.clock = clock
        self.flush_hooks: list[Callable[[Any, dt.datetime], None]] = []
        #: Called inside each transaction that writes hellos, after them, with ``[(host_id, context)]``
        #: (in a savepoint: a hook that raises is logged and rolled back, the hellos are written).
        self.hello_hooks: list[Callable[[list[tuple[int, Any]]], None]] = []
        self.flushes = 0  # interval flushes written (heartbeats + hooks)
        self._cond = threading.Condition()
        self._hellos: list[_Hello] = []
        self._queued: dict[Callable[[list], None], list] = {}  # batch writer -> its items, in order
        self._queued_retry = False  # the queued items were put back once after a failed write
        self._offline: set[int] = set()
        self._seen: set[int] = set()
        self._final: set[int] = set()  # written offline whatever the registry says (stop)
        self._write_lock = threading.Lock()  # one writer at a time (the thread, or an inline caller)
        self._first_hello_at = 0.0  # time.monotonic() of the oldest queued hello (the linger is real time)
        self._last_hellos_written = -math.inf  # time.monotonic() when the writer last wrote hellos
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_interval = clock() + self.interval_s

    # -- what connections call -----------------------------------------------------------

    def hello(self, host_id: int, values: dict[str, Any], timeout: float, context: Any = None) -> bool:
        """Queue the host's hello and wait until it is committed; False if it was not (in time)."""
        item = _Hello(host_id, values, context)
        with self._cond:
            if self._stopping:
                return False
            self._offline.discard(host_id)
            if not self._hellos:
                self._first_hello_at = time.monotonic()
            self._hellos.append(item)
            self._cond.notify()
            running = self._thread is not None
        if not running:  # no writer thread (an app not started by ``serve``): write it now
            self._flush_inline()
        item.done.wait(timeout)
        return item.ok

    def queue(self, write: Callable[[list], None], item: Any) -> None:
        """Have ``write`` called with ``item`` (and the others queued for it) in the next transaction.

        ``write(items)`` runs on the writer's session, inside its transaction; it may register
        after-commit callbacks (:func:`app.oncommit.on_commit`). Nobody waits for the commit; a
        failed transaction is tried again once with the items still queued, then they are dropped
        (logged), so that they never hold up the hellos.
        """
        with self._cond:
            if self._stopping and self._thread is None:
                return
            self._queued.setdefault(write, []).append(item)
            self._cond.notify()
            running = self._thread is not None
        if not running:
            self._flush_inline()

    def note(self, host_id: int) -> None:
        """A frame arrived from the host: its ``last_seen`` is written with the next interval flush."""
        with self._cond:
            self._seen.add(host_id)

    def offline(self, host_id: int) -> None:
        """The host's socket here closed and no newer one took over: write it offline soon."""
        with self._cond:
            if self._stopping:
                return  # stop() writes every host this process held offline in one statement
            self._offline.add(host_id)
            self._seen.discard(host_id)
            self._cond.notify()
            running = self._thread is not None
        if not running:
            self._flush_inline()

    def _flush_inline(self) -> None:
        try:
            self.flush(heartbeats=False)
        except Exception:  # noqa: BLE001 - the caller's hello fails (its agent retries); logged here
            log.exception("presence: writing hosts' online state failed")

    # -- the writer ----------------------------------------------------------------------

    def flush(self, heartbeats: bool = True) -> FlushResult:
        """Write everything queued in one transaction; with ``heartbeats``, the noted
        ``last_seen`` too and the flush hooks. Safe from any thread (one writer at a time)."""
        with self._write_lock:
            with self._cond:
                hellos, self._hellos = self._hellos, []
                queued, self._queued = self._queued, {}
                offline, self._offline = self._offline, set()
                final, self._final = self._final, set()
                seen = set()
                if heartbeats:
                    seen, self._seen = self._seen, set()
            try:
                res = self._write(hellos, queued, offline, final, seen, heartbeats)
                self._queued_retry = False
            except Exception:
                db.session.rollback()
                with self._cond:  # keep what is still true for the next attempt
                    if self._queued_retry:
                        # Tried twice: drop them, so that a batch that cannot be written never
                        # keeps the hellos behind it from being recorded.
                        n = sum(len(items) for items in queued.values())
                        if n:
                            log.warning("presence: dropped %d queued report(s) that could not be written", n)
                    else:
                        for write, items in queued.items():
                            self._queued[write] = items + self._queued.get(write, [])
                    self._queued_retry = bool(queued) and not self._queued_retry
                    self._offline |= {h for h in offline if not self.live(h)}
                    self._final |= final
                    self._seen |= seen
                raise
            finally:
                for item in hellos:
                    item.done.set()
                db.session.close()
            return res

    def _write(
        self,
        hellos: list[_Hello],
        queued: dict[Callable[[list], None], list],
        offline: set[int],
        final: set[int],
        seen: set[int],
        interval: bool,
    ) -> FlushResult:
        res = FlushResult()
        now = utcnow()
        t = Host.__table__
        held = _held_here()
        latest = {item.host_id: item for item in hellos}  # a reconnect's hello supersedes an older one
        hooked = self._select_for_hooks(latest) if latest else []
        if offline or final:
            gone = sorted({h for h in offline if not self.live(h)} | final)
            for chunk in _chunks(gone):
                q = sa.update(t).where(t.c.id.in_(chunk), *(t.c[c] == v for c, v in held.items()))
                db.session.execute(q.values(connected=False, last_seen=now))
                res.statements += 1
            res.offline = len(gone)
        for write, items in queued.items():  # before the hellos: a report, then its agent's reconnect
            write(items)
            res.queued += len(items)
        if hellos:
            # bind names must differ from column names in an UPDATE's SET clause: prefix them
            rows = [
                {
                    "p_id": h,
                    "p_live": self.live(h),
                    "p_at": item.at,
                    **{"v_" + c: v for c, v in {**item.values, **held}.items()},
                }
                for h, item in latest.items()
            ]
            columns = [k[2:] for k in rows[0] if k.startswith("v_")]
            mine = sa.bindparam("p_id") == t.c.id
            if held:
                # A peer's newer claim stands: in a storm an agent gives up on a slow welcome here and
                # reconnects to a peer, whose hello may commit first; this late one must not move
                # the host back here (and its close then mark it offline while it is live there).
                # A hello writes its arrival time as last_seen: the claim whose hello came last wins,
                # whichever commits first.
                mine = sa.and_(
                    mine,
                    sa.or_(
                        t.c.connected.is_not(True),
                        t.c.instance_id.is_(None),
                        t.c.instance_id == held["instance_id"],
                        t.c.last_seen.is_(None),
                        t.c.last_seen <= sa.bindparam("p_at", type_=t.c.last_seen.type),
                    ),
                )
            stmt = (
                sa.update(t)
                .where(mine)
                .values(
                    {
                        **{c: sa.bindparam("v_" + c, type_=t.c[c].type) for c in columns},
                        "last_seen": sa.bindparam("p_at", type_=t.c.last_seen.type),  # when it arrived
                        # online only with a socket here and a token: a revoke committed first stays revoked
                        "connected": sa.and_(sa.bindparam("p_live", type_=sa.Boolean), t.c.token_hash.is_not(None)),
                    }
                )
            )
            db.session.execute(stmt, rows)
            res.statements += 1
            res.hellos = len(rows)
            for hook, batch in hooked:
                try:
                    with db.session.begin_nested():  # a failing hook must not cost the hellos
                        hook(batch)
                except Exception:  # noqa: BLE001 - logged; the hellos are written without it
                    log.exception("presence: a hello hook failed; the hellos are recorded without it")
        if interval:
            alive = sorted(h for h in seen if self.live(h))
            for chunk in _chunks(alive):
                db.session.execute(
                    sa.update(t)
                    .where(t.c.id.in_(chunk), t.c.token_hash.is_not(None))
                    .values(last_seen=now, connected=True, **held)
                )
                res.statements += 1
            res.heartbeats = len(alive)
            for hook in self.flush_hooks:
                hook(db.session, now)
        if res.statements or res.queued or interval:
            db.session.commit()
        for item in hellos:
            item.ok = True
        if interval:
            self.flushes += 1
        return res

    def _select_for_hooks(self, latest: dict[int, _Hello]) -> list[tuple[Callable, list]]:
        """Each hello hook with the hellos it is to run for.

        A hook with a ``select`` attribute first reads which hellos it has work for; only those go
        to it, and no savepoint is opened for it when there are none (a reconnect storm's usual
        case). The reads run first in the transaction, before any write: one that fails is rolled
        back with nothing lost, and its hook is left out of this batch (its hellos' contexts stay
        unread, so whoever reconciles them later reads for itself).
        """
        hooked = []
        for hook in self.hello_hooks:
            batch = [(h, item.context) for h, item in latest.items()]
            select = getattr(hook, "select", None)
            if select is not None:
                try:
                    batch = select(batch)
                except Exception:  # noqa: BLE001 - logged; the hellos are written without the hook
                    log.exception("presence: a hello hook's read failed; the hellos are recorded without it")
                    db.session.rollback()
                    continue
            if batch:
                hooked.append((hook, batch))
        return hooked

    def start(self, app: Flask) -> None:
        """Start the writer thread (``serve`` does, before the agent plane listens)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self.interval_s = self._configured_interval or flush_interval(app.config)
            self._next_interval = self.clock() + self.interval_s
            self._thread = threading.Thread(target=self._run, args=(app,), name="presence-writer", daemon=True)
        self._thread.start()

    def stop(self, offline: set[int] | frozenset[int] = frozenset(), timeout: float = 5.0) -> None:
        """Write what is queued, and ``offline`` (the hosts this process holds) offline; then stop.

        Called before the sockets are closed: their disconnects are not written one by one, and
        hellos still arriving are refused (the agents retry against the next server).
        """
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._final |= set(offline)
            self._seen.clear()
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)
            with self._cond:
                self._thread = None
        elif self._final:
            self._flush_inline()

    def _run(self, app: Flask) -> None:
        with app.app_context():
            while True:
                with self._cond:
                    while not (self._stopping or self._hellos or self._offline or self._queued):
                        left = self._next_interval - self.clock()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    self._linger()
                    stopping = self._stopping
                    interval = self.clock() >= self._next_interval
                    if interval:
                        self._next_interval = self.clock() + self.interval_s
                try:
                    res = self.flush(heartbeats=interval and not stopping)
                    if res.hellos:
                        self._last_hellos_written = time.monotonic()
                except Exception:  # the writer must outlive a database hiccup
                    log.exception("presence: writing hosts' online state failed; retrying in %g s", RETRY_S)
                    if not stopping:
                        time.sleep(RETRY_S)
                        continue
                if stopping:
                    return

    def _linger(self) -> None:
        """Under a stream of hellos, let the batch gather (see ``HELLO_LINGER_S``); call holding ``_cond``."""
        if not self._hellos or time.monotonic() - self._last_hellos_written >= BUSY_WINDOW_S:
            return
        until = self._first_hello_at + HELLO_LINGER_S
        while not self._stopping and len(self._hellos) < MAX_LINGER_BATCH:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    @property
    def queued_hellos(self) -> int:
        with self._cond:
            return len(self._hellos)

    @contextlib.contextmanager
    def writing(self):
        """Hold the writer for the block, as a slow commit would (tests)."""
        with self._write_lock:
            yield

    def wake(self) -> None:
        """Flush the noted heartbeats now (tests; a clock moved by hand)."""
        with self._cond:
            self._next_interval = self.clock()
            self._cond.notify()


def _socket_here(host_id: int) -> bool:
    # get(), not is_connected(): with several instances that also counts a socket on a peer
    return runtime().connections.get(host_id) is not None


def _held_here() -> dict[str, Any]:
    """Several instances: the columns that say this instance holds a host's socket."""
    instance_id = runtime().instance_id
    return {} if instance_id is None else {"instance_id": instance_id}


def flush_interval(config) -> float:
    """``PRESENCE_FLUSH_S``, or half the heartbeat interval (what one host's writes were before)."""
    return float(config.get("PRESENCE_FLUSH_S") or max(0.05, float(config["HEARTBEAT_S"]) / 2))


def _chunks(ids: list[int]):
    for i in range(0, len(ids), MAX_IDS_PER_STATEMENT):
        yield ids[i : i + MAX_IDS_PER_STATEMENT]
