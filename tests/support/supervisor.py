"""A tiny process supervisor for tests and benchmarks: what systemd's ``Restart=always`` does.

It starts a command, restarts it whenever it exits (after ``restart_sec``), counts restarts and
exit codes, and appends the child's stdout and stderr to one log file. No pytest imports: the
benchmark scripts use it too (through ``tests.support.live``). The product does not: ``demo``
keeps its one agent running with its own small loop (``app/demo.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time


class Supervisor:
    """Keep ``cmd`` running in ``cwd`` with ``env`` until :meth:`stop` is called."""

    def __init__(self, cmd, cwd=None, env=None, *, log_path=None, restart_sec=0.05, stop_timeout=5.0):
        self.cmd = list(cmd)
        self.cwd = cwd
        self.env = env
        self.restart_sec = restart_sec
        self.stop_timeout = stop_timeout
        self.log_path = log_path or os.path.join(cwd or ".", "supervisor.log")
        self.starts = 0
        self.exit_codes: list[int] = []
        self.start_times: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> Supervisor:
        """Start the child and the watching thread (again after :meth:`stop`); return self for chaining."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()
        self.wait_for(lambda: self.starts >= 1, timeout=self.stop_timeout)
        return self

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        with open(self.log_path, "ab", buffering=0) as log:
            while not self._stopping.is_set():
                with self._changed:
                    # decided under the lock so stop() either sees this child or stops us starting it
                    if self._stopping.is_set():
                        break
                    log.write(f"--- supervisor: starting {' '.join(self.cmd)}\n".encode())
                    proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
                    self._proc = proc
                    self.starts += 1
                    self.start_times.append(time.monotonic())
                    self._changed.notify_all()
                code = proc.wait()
                log.write(f"--- supervisor: exited with {code}\n".encode())
                with self._changed:
                    self.exit_codes.append(code)
                    self._changed.notify_all()
                if self._stopping.wait(self.restart_sec):
                    break

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true (re-checked on every start and exit); return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.05))
            return True

    def wait_for_restarts(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda: self.restarts >= n, timeout)

    def stop(self) -> int | None:
        """Stop restarting, SIGTERM the child (SIGKILL after ``stop_timeout``); return its exit code."""
        with self._changed:
            self._stopping.set()
            proc = self._proc
        code = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM if hasattr(signal, "SIGTERM") else signal.CTRL_BREAK_EVENT)
            try:
                code = proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        elif proc is not None:
            code = proc.returncode
        if self._thread is not None:
            self._thread.join(self.stop_timeout)
        return code

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""
