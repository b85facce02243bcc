"""Daemon hygiene: named exit codes, a signal-safe stop flag and a dependency-free sd_notify."""

from __future__ import annotations

import os
import signal
import socket

#: Exit codes. 78 is sysexits' EX_CONFIG, which systemd maps to "configuration error".
EX_OK = 0
EX_SOFTWARE = 70
EX_CONFIG = 78
#: After swapping in a new program the agent re-executes it in place (agent/reexec.py); only when
#: that fails (or with ``restart_mode = "exit"``, or on Windows) it exits 0 so that
#: ``Restart=always`` starts the new file.
EX_UPDATE_RESTART = 0
#: After rolling back to the previous program (probation failed): the same, for the restored file.
EX_ROLLBACK_RESTART = 0


class StopFlag:
    """A flag a signal handler may set: one attribute store, no locks, no I/O.

    ``threading.Event.set`` takes a lock that the interrupted main thread may already hold, so the
    handler only stores a bool and the main loop polls it in short slices.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self.requested = True

    def is_set(self) -> bool:
        return self.requested


def install_signal_handlers(flag: StopFlag) -> None:
    """Make SIGTERM and SIGINT (and SIGBREAK on Windows) request a warm stop via ``flag``."""

    def handler(signum, frame):  # noqa: ARG001 - signature fixed by the signal module
        flag.set(signum)

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; do nothing outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not hasattr(socket, "AF_UNIX"):
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False
