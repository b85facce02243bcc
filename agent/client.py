"""The agent's connection loop: connect, hello, welcome, heartbeats, commands, reconnect with backoff.

One :class:`Agent` owns the link to the server. The main thread runs :meth:`Agent.run`; it waits
in short slices so a stop request (set by a signal handler) is seen within a fraction of a second.
An update runs in a worker thread so heartbeats keep flowing while the new program downloads.

The link itself (WebSocket client, send lock, clean close, reconnect backoff) is
:mod:`agent.transport`; the watchdog that commits or rolls back a newly swapped-in program is
:mod:`agent.probation`; the download and swap are :mod:`agent.updater`.
"""

from __future__ import annotations

import functools
import logging
import platform
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable

import simple_websocket
from simple_websocket.errors import ConnectionClosed

from agent import platform_tag, program_path, protocol
from agent.config import AgentConfig
from agent.daemon import EX_OK, EX_ROLLBACK_RESTART, EX_UPDATE_RESTART, StopFlag
from agent.probation import Probation
from agent.statefile import last_update_for_hello, mark_reported, ran_job, remember_job
from agent.tls import describe_trust
from agent.transport import Backoff, Link, default_connect
from agent.updater import UpdateCommand, UpdateError, Updater, can_self_update
from agent.version import get_version

log = logging.getLogger("agent")

#: A connection that lived this long (or was welcomed) proves the server is back: restart backoff.
STABLE_CONNECTION_S = 10.0
WELCOME_TIMEOUT_S = 10.0
#: Longest the main loop blocks before re-checking the stop and restart flags.
TICK_S = 0.25
#: Floor for the heartbeat interval, so a bad welcome cannot turn the loop into a busy spin.
MIN_HEARTBEAT_S = 0.05

_CLOSE_MEANINGS = {
    protocol.CLOSE_REVOKED: "the server revoked this agent's token (or deleted the host)",
    protocol.CLOSE_REPLACED: "another connection with this agent's token replaced this one",
    protocol.CLOSE_IDLE: "the server dropped the link as idle (no heartbeat in time)",
    protocol.CLOSE_TOO_BIG: "the server refused a frame as too large",
    protocol.CLOSE_POLICY: "the server closed the link for a policy violation",
    protocol.CLOSE_GOING_AWAY: "the server is shutting down (a restart?); reconnecting as soon as it is back",
}

_PROCESS_BOOT_ID = str(uuid.uuid4())

#: ``Agent.host_id`` before this connection's welcome: no command is accepted yet.
UNWELCOMED = object()


def boot_id() -> str:
    """Return the kernel's boot id on Linux, else an id fixed for this process's lifetime."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            value = fh.read().strip()
        if value:
            return value
    except OSError:
        pass
    return _PROCESS_BOOT_ID


class Agent:
    """The long-running agent: keeps one link to the server and acts on its commands."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        version: str | None = None,
        stop: StopFlag | None = None,
        connect: Callable[[str, str], object] | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        program: str | None | type[Ellipsis] = ...,
        updater_factory: Callable[[UpdateCommand], Updater] | None = None,
        welcome_timeout: float = WELCOME_TIMEOUT_S,
        tick: float = TICK_S,
    ):
        self.config = config
        self.version = version or get_version()
        self.stop = stop or StopFlag()
        self._connect = connect or functools.partial(default_connect, server_ca=config.server_ca)
        self._sleep = sleep or self._interruptible_sleep
        self.clock = clock
        self.backoff = Backoff(cap=config.backoff_max_s, rand=rand, clock=clock)
        self.program = program_path() if program is ... else program
        self._updater_factory = updater_factory or self._make_updater
        self.welcome_timeout = welcome_timeout
        self.tick = tick
        self._link: Link | None = None
        self._link_lock = threading.Lock()
        self._update_lock = threading.Lock()
        self._update_job: str | None = None
        #: The host id the server's welcome named (None from a server that names none).
        self.host_id: int | None | object = UNWELCOMED
        self._update_thread: threading.Thread | None = None
        self._restart = threading.Event()
        self._pending: list[str] = []  # update.result frames that found no live link
        self._was_welcomed = False
        self.connections = 0
        self.probation = Probation(
            self.program,
            config.state_dir,
            self.version,
            config.probation_s,
            stopped=self.stop.is_set,
            on_rollback=self._rolled_back,
            tick=tick,
        )

    # ----------------------------------------------------------------- public

    def request_stop(self) -> None:
        """Ask the main loop to close the link and return (safe from a signal handler)."""
        self.stop.set()

    @property
    def restart_pending(self) -> bool:
        """True when :meth:`run` returned so that the program file (swapped in, or restored) gets started.

        The caller restarts into it: in place (:func:`agent.reexec.restart_in_place`) or by exiting
        0 for the service manager. A stop request wins over it.
        """
        return self._restart.is_set() and not self.stop.is_set()

    def update_unavailable(self) -> str | None:
        """Why this agent cannot update itself (the hello's ``update_unavailable``), or None."""
        if not can_self_update(self.program):
            return protocol.UPDATE_UNAVAILABLE_NOT_REPLACEABLE
        # "update" also needs a way to trust a release: a pinned key, or the explicit lab opt-out
        if not self.config.updates_allowed:
            return protocol.UPDATE_UNAVAILABLE_NO_KEY
        return None

    def capabilities(self) -> list[str]:
        """Return what this agent can do; ``update`` only if it can really replace its program."""
        return [] if self.update_unavailable() else ["update"]

    def _log_update_unavailable(self) -> None:
        why = self.update_unavailable()
        if why == protocol.UPDATE_UNAVAILABLE_NO_KEY:
            log.warning(
                "this agent cannot update itself: no release key is pinned (release_public_key in %s). "
                "Re-run the install one-liner with --release-key, or add the key to the config and restart.",
                self.config.path,
            )
        elif why == protocol.UPDATE_UNAVAILABLE_NOT_REPLACEABLE:
            log.warning(
                "this agent cannot update itself: it does not run from a program file in a directory it may "
                "write (%s). Install it with install-agent.sh to get self-updates.",
                self.program or "run from source",
            )

    def hello_data(self) -> dict:
        """Return the data of the ``hello`` envelope."""
        try:
            last_update = last_update_for_hello(self.config.state_dir, self.version)
        except OSError as exc:
            log.warning("cannot read the update state: %s", exc)
            last_update = None
        return {
            "agent_version": self.version,
            "os": platform.system().lower(),
            "arch": platform.machine(),
            "hostname": socket.gethostname(),
            "python": platform.python_version(),
            "capabilities": self.capabilities(),
            "boot_id": boot_id(),
            "last_update": last_update,
            "platform": platform_tag(),
            "update_unavailable": self.update_unavailable(),
        }

    def run(self) -> int:
        """Stay connected until stopped (exit code EX_OK) or an update swapped the program."""
        log.info("restic-manager agent %s starting; server %s", self.version, self.config.server_url)
        self._log_update_unavailable()
        code = self._start_up()
        if code is not None:
            return code
        while True:
            if self.stop.is_set():
                return self._finish(EX_OK)
            if self._restart.is_set():
                return self._finish(EX_UPDATE_RESTART)
            started = self.clock()
            welcomed = going_away = refused = False
            spread = None  # the return window a 1001 named
            try:
                ws = self._open()
                if ws is None:
                    continue  # stop requested while connecting
            except simple_websocket.ConnectionError as exc:
                self._log_refused(exc.status_code)
            except ConnectionRefusedError as exc:  # nothing listens: the server is down (or restarting)
                refused = True
                level = logging.INFO if self.backoff.restarting else logging.WARNING
                log.log(level, "cannot connect to %s: %s", self.config.ws_url, exc)
            except ssl.SSLCertVerificationError as exc:
                log.error(
                    "cannot connect to %s: the server's certificate is not trusted (%s); this agent trusts %s; "
                    "will keep retrying with backoff",
                    self.config.ws_url,
                    exc.verify_message or exc,
                    describe_trust(self.config.server_ca),
                )
            except OSError as exc:
                log.warning("cannot connect to %s: %s", self.config.ws_url, exc)
            except Exception:  # top of the loop: a surprise must cost one attempt, not the agent
                log.exception("unexpected error connecting to %s", self.config.ws_url)
            else:
                self.connections += 1
                link = Link(ws)
                with self._link_lock:
                    self._link = link
                try:
                    welcomed = self._session(link)
                except Exception:
                    log.exception("unexpected error on the link; reconnecting")
                finally:
                    with self._link_lock:
                        self._link = None
                    going_away = link.close_code == protocol.CLOSE_GOING_AWAY
                    spread = link.reconnect_spread
                    link.close()
            if self.stop.is_set() or self._restart.is_set():
                continue
            if welcomed or self.clock() - started >= STABLE_CONNECTION_S:
                self.backoff.reset()
            if going_away:  # the server is shutting down: while it restarts, refusals don't climb the ladder
                self.backoff.server_going_away(spread)
            delay = self.backoff.next_delay(refused=refused)
            log.info("reconnecting in %.2f s", delay)
            self._sleep(delay)

    def _open(self):
        """Connect in a helper thread so a stop request is honoured even mid-connect."""
        # a TCP connect or TLS handshake can block for the whole connect timeout, and a signal
        # handler that only sets a flag cannot interrupt it; the main thread keeps polling instead
        result: dict = {}
        done = threading.Event()

        def work():
            try:
                result["ws"] = self._connect(self.config.ws_url, self.config.token)
            except BaseException as exc:  # handed to the main thread, which decides
                result["exc"] = exc
            finally:
                done.set()
                if self.stop.is_set() and "ws" in result:
                    Link(result["ws"]).close()  # nobody is waiting for this connection any more

        threading.Thread(target=work, name="connect", daemon=True).start()
        while not done.wait(self.tick):
            if self.stop.is_set():
                return None
        if "exc" in result:
            raise result["exc"]
        return result["ws"]

    # ----------------------------------------------------------------- the session

    def _session(self, link: Link) -> bool:
        """Run one connection until it drops or we stop; return True if it was welcomed."""
        try:
            link.send(protocol.encode("hello", self.hello_data()))
            welcome = self._await_welcome(link)
            if welcome is None:
                return False
            self._welcomed(link, welcome)
            interval = self.config.heartbeat_s or max(MIN_HEARTBEAT_S, float(welcome.data["heartbeat_s"]))
            next_beat = self.clock() + interval
            while True:
                if self.stop.is_set():
                    log.info("stopping: closing the link")
                    return True
                if self._restart.is_set():
                    log.info("restarting into the new program: closing the link")
                    return True
                now = self.clock()
                if now >= next_beat:
                    link.send(protocol.encode("heartbeat"))
                    next_beat = now + interval
                frame = link.receive(min(self.tick, max(0.0, next_beat - now)))
                if frame is not None:
                    self._handle(link, frame)
        except (ConnectionClosed, OSError) as exc:
            self._log_closed(link, exc)
            return self._was_welcomed

    def _await_welcome(self, link: Link) -> protocol.Envelope | None:
        self._was_welcomed = False
        self.host_id = UNWELCOMED
        deadline = self.clock() + self.welcome_timeout
        while not (self.stop.is_set() or self._restart.is_set()):
            remaining = deadline - self.clock()
            if remaining <= 0:
                log.warning("no welcome from the server within %g s; reconnecting", self.welcome_timeout)
                return None
            frame = link.receive(min(self.tick, remaining))
            if frame is None:
                continue
            env = self._decode(link, frame)
            if env is None:
                continue
            if env.type == "welcome":
                return env
            self._dispatch(link, env)
        return None

    def _welcomed(self, link: Link, welcome: protocol.Envelope) -> None:
        self._was_welcomed = True
        self.host_id = welcome.data.get("host_id")
        self.backoff.reset()
        log.info(
            "connected to %s (server %s, agent %s)",
            self.config.server_url,
            welcome.data["server_version"],
            self.version,
        )
        self.probation.commit()
        try:
            mark_reported(self.config.state_dir)
        except OSError as exc:
            log.warning("cannot mark the last update as reported: %s", exc)
        with self._update_lock:
            pending, self._pending = self._pending, []
        for frame in pending:
            link.send(frame)

    def _decode(self, link: Link, frame: str | bytes) -> protocol.Envelope | None:
        try:
            return protocol.decode(frame)
        except protocol.ProtocolError as exc:
            log.warning("bad frame from the server (%s): %s", exc.code, exc.message)
            link.send(protocol.error_frame(exc.code, exc.message, ref=exc.ref or None))
            return None

    def _handle(self, link: Link, frame: str | bytes) -> None:
        env = self._decode(link, frame)
        if env is not None:
            self._dispatch(link, env)

    def _dispatch(self, link: Link, env: protocol.Envelope) -> None:
        if env.type == "ping":
            link.send(protocol.encode("pong", {"ref": env.id}))
        elif env.type == "command.update":
            self._start_update(link, env)
        elif env.type == "error":
            log.warning("server reported an error: %s: %s", env.data["code"], env.data["message"])
        elif env.type == "welcome":
            log.debug("ignoring a repeated welcome")
        elif env.type == "pong":
            pass
        else:
            log.warning("unexpected %r envelope from the server", env.type)
            link.send(protocol.error_frame("unexpected_type", f"the agent does not accept {env.type!r}", ref=env.id))

    # ----------------------------------------------------------------- updates

    def _make_updater(self, cmd: UpdateCommand) -> Updater:
        return Updater(
            self.program,
            self.config.state_dir,
            self.config.server_url,
            self.config.token,
            self.version,
            release_public_key=self.config.release_public_key,
            allow_unsigned=self.config.allow_unsigned_updates,
            server_ca=self.config.server_ca,
        )

    def _misdirected(self, env: protocol.Envelope) -> tuple[str, str] | None:
        """Why a ``command.update`` is not for this agent (error code, message), or None if it is."""
        if self.host_id is UNWELCOMED:
            return "not_welcomed", "a command before the server's welcome is not accepted"
        if self.host_id is not None and env.data.get("host_id") != self.host_id:
            return "wrong_host", f"command for host {env.data.get('host_id')}, but this agent is host {self.host_id}"
        return None

    def _start_update(self, link: Link, env: protocol.Envelope) -> None:
        cmd = UpdateCommand.from_data(env.data)
        misdirected = self._misdirected(env)
        if misdirected:
            # Never acted on, never answered with update.result: that would name a job of another host.
            code, message = misdirected
            log.warning("refusing update job %s: %s", cmd.job_id, message)
            link.send(protocol.error_frame(code, message, ref=env.id))
            return
        refusal = None
        with self._update_lock:
            if cmd.job_id == self._update_job:
                log.warning("ignoring a repeated command for update job %s: it is running now", cmd.job_id)
                return
            if self._already_ran(cmd.job_id):
                log.warning(
                    "ignoring command.update for job %s: this agent already ran it (a replayed command)", cmd.job_id
                )
                return
            if cmd.version == self.version:
                refusal = f"this agent already runs version {cmd.version}: nothing to update"
                self._remember(cmd.job_id)
            elif self._update_job is not None:
                refusal = f"another update (job {self._update_job}) is already in progress"
            elif not can_self_update(self.program):
                refusal = "this agent cannot self-update: it does not run from a zipapp in a writable directory"
            else:
                self._remember(cmd.job_id)
                self._update_job = cmd.job_id
                self._update_thread = threading.Thread(
                    target=self._run_update, args=(cmd,), name=f"update-{cmd.job_id}", daemon=True
                )
        if refusal:
            log.warning("refusing update job %s: %s", cmd.job_id, refusal)
            self._send_result(cmd.job_id, refusal)
            return
        log.info("update job %s: updating %s -> %s", cmd.job_id, self.version, cmd.version)
        self._update_thread.start()

    def _already_ran(self, job_id: str) -> bool:
        try:
            return ran_job(self.config.state_dir, job_id)
        except OSError as exc:
            log.warning("cannot read the update jobs already run: %s", exc)
            return False

    def _remember(self, job_id: str) -> None:
        try:
            remember_job(self.config.state_dir, job_id)
        except OSError as exc:
            # the update itself still runs (and fails on its own if the state folder is unusable)
            log.warning("cannot record update job %s as run: %s", job_id, exc)

    def _run_update(self, cmd: UpdateCommand) -> None:
        def progress(phase: str, done: int, total: int) -> None:
            frame = protocol.encode(
                "update.progress", {"job_id": cmd.job_id, "phase": phase, "bytes_done": done, "bytes_total": total}
            )
            self._send_current(frame)

        try:
            self._updater_factory(cmd).run(cmd, progress, cancelled=self.stop.is_set)
        except UpdateError as exc:
            log.error("update job %s failed: %s", cmd.job_id, exc)
            self._send_result(cmd.job_id, str(exc))
        except Exception as exc:  # top of a worker thread: report, never die silently
            log.exception("update job %s failed unexpectedly", cmd.job_id)
            self._send_result(cmd.job_id, f"update failed: internal error: {exc!r}")
        else:
            self._restart.set()
            # Close the link from here so the main loop, blocked in receive for up to a tick,
            # wakes now (the server's close reply ends its wait) instead of at its next tick.
            self._close_current("restarting into the new program")
        finally:
            with self._update_lock:
                self._update_job = None

    def _send_result(self, job_id: str, error: str) -> None:
        frame = protocol.encode("update.result", {"job_id": job_id, "ok": False, "error": error})
        if not self._send_current(frame):
            # keep it for the next welcome: the server must learn why the job failed
            with self._update_lock:
                self._pending.append(frame)

    def _close_current(self, message: str) -> None:
        with self._link_lock:
            link = self._link
        if link is not None:
            log.info("%s: closing the link", message)
            link.close(protocol.CLOSE_NORMAL, message)

    def _send_current(self, frame: str) -> bool:
        with self._link_lock:
            link = self._link
        if link is None:
            return False
        try:
            link.send(frame)
            return True
        except (ConnectionClosed, OSError):
            return False

    # ----------------------------------------------------------------- start-up and probation

    def _start_up(self) -> int | None:
        """Repair a half-finished update; start the probation watchdog; None means carry on."""
        if self.config.allow_unsigned_updates and not self.config.release_public_key:
            log.warning(
                "allow_unsigned_updates is on and no release key is pinned: this agent will install "
                "UNSIGNED updates from whoever controls its server link. Use it in labs only."
            )
        if not self.program:
            return None  # run from source: there is no program file to repair or roll back
        if self.probation.start_up():
            self._restart.set()  # the restored program must be started: see restart_pending
            return EX_ROLLBACK_RESTART
        return None

    def _rolled_back(self) -> None:
        # called from the probation thread once the previous program is back in place
        self._restart.set()
        self._close_current("rolled back to the previous program")

    # ----------------------------------------------------------------- helpers

    def _finish(self, code: int) -> int:
        thread = self._update_thread
        if thread is not None and thread.is_alive():
            # the worker sees the stop flag between chunks and removes its partial download
            thread.join(0.5)
        return code

    def _interruptible_sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not (self.stop.is_set() or self._restart.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(self.tick, remaining))

    def _log_refused(self, status: int | None) -> None:
        if status in (401, 403):
            log.error(
                "the server refused this agent's token (HTTP %s): the host may be revoked or deleted; "
                "will keep retrying with backoff",
                status,
            )
        else:
            log.warning("the server refused the WebSocket upgrade (HTTP %s)", status)

    def _log_closed(self, link: Link, exc: Exception) -> None:
        if self.stop.is_set() or self._restart.is_set():
            return
        code = link.close_code if isinstance(exc, ConnectionClosed) else None
        meaning = _CLOSE_MEANINGS.get(code)
        if code == protocol.CLOSE_REVOKED:
            log.error("link closed (code %s): %s; will keep retrying with backoff", code, meaning)
        elif code == protocol.CLOSE_GOING_AWAY and (spread := link.reconnect_spread):
            log.warning("link closed (code %s): %s, within the %g s it named", code, meaning, spread)
        elif meaning:
            log.warning("link closed (code %s): %s", code, meaning)
        else:
            log.warning("link lost: %s", link.close_message or exc)
