"""Restart into the program file in place: ``execv`` of the same interpreter on the swapped file.

After a verified swap (or a rollback that put ``.old`` back) the agent must run the program file
that is now in place. Exiting and letting systemd start it costs the unit's ``RestartSec`` (2 s)
every time; re-executing costs only the interpreter's start-up (about 0.1 s). So on POSIX the agent
closes its link and calls :func:`restart_in_place`, which returns only when the ``execv`` failed —
then the agent exits 0 and the service manager starts the file the slow way.

What crosses the exec, and what does not (docs/agent.md, "Restart in place"):

* the PID, the cgroup, the environment, the working directory and stdin/stdout/stderr (the
  journal stream): systemd sees one long-running main process;
* **no other file descriptor**: Python opens everything close-on-exec (PEP 446), and this module
  marks every descriptor above 2 close-on-exec again before the exec, so neither the old link's
  socket nor any file can leak into the new program;
* the state on disk: ``probation.json`` (its ``started_at`` keeps the probation deadline),
  ``update-state.json``, ``update-jobs.json``; the boot id is the kernel's and does not change.

The exec'd start bypasses the sh guard (systemd's ``ExecStartPre=`` runs only when systemd starts
the unit), so :func:`agent.recovery.count_unguarded_start` counts it in the marker's
``attempts`` first, exactly as the guard would have. If the new program then crashes, systemd
restarts the unit after ``RestartSec`` with the guard in front, and the third failed start of the
new program still restores the old one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from agent import recovery
from agent.failpoints import failpoint

log = logging.getLogger("agent.reexec")


def supported() -> bool:
    """True where ``execv`` replaces the process image (POSIX; Windows' exec spawns a new PID)."""
    return os.name == "posix"


def reexec_argv(
    program: str,
    argv: list[str] | None = None,
    orig_argv: list[str] | None = None,
    executable: str | None = None,
) -> list[str]:
    """The command line that starts ``program`` as this process was started.

    Same interpreter (``sys.executable``, the path systemd ran, e.g. ``/usr/bin/python3``: after a
    Python upgrade it names the new interpreter, as a fresh start would), the same interpreter
    options (``-I``, ``-X …``: taken from ``sys.orig_argv``), the absolute program path, and the
    same program arguments (``--config FILE``).
    """
    argv = list(sys.argv if argv is None else argv)
    orig = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    executable = executable or sys.executable
    # orig_argv is [interpreter, *options, script, *args]; argv is [script, *args]
    options = orig[1 : len(orig) - len(argv)] if len(orig) > len(argv) and argv else []
    return [executable, *options, os.path.abspath(program), *argv[1:]]


def close_on_exec_all() -> int:
    """Mark every open descriptor above 2 close-on-exec; return how many were inheritable."""
    fixed = 0
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    for fd in fds:
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                os.set_inheritable(fd, False)
                fixed += 1
        except OSError:
            pass  # closed meanwhile (e.g. the listdir's own descriptor)
    return fixed


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def restart_in_place(
    program: str,
    state_dir: str,
    *,
    stopped: Callable[[], bool] = lambda: False,
    execv: Callable[[str, list[str]], None] = os.execv,
) -> str:
    """Replace this process with a fresh start of ``program``; return the reason only if it did not.

    Call it from the main thread after the link is closed. On success it never returns.
    ``stopped`` is checked last thing before the exec: a SIGTERM whose handler ran meanwhile must
    end the process, not be forgotten by the new image (systemd would then wait its stop timeout).
    """
    if not sys.executable:  # an embedding interpreter that cannot name itself
        reason = "the interpreter's path is unknown (sys.executable is empty)"
        log.error("cannot re-execute %s: %s; exiting so the service manager starts it", program, reason)
        return reason
    argv = reexec_argv(program)
    try:
        recovery.count_unguarded_start(state_dir)
    except OSError as exc:  # the agent's own start count still guards a crash loop
        log.warning("cannot count the re-executed start in the probation marker: %s", exc)
    failpoint("before_reexec", state_dir)
    leaked = close_on_exec_all()
    if leaked:
        log.debug("marked %d inheritable descriptors close-on-exec", leaked)
    log.info("restarting in place: %s", " ".join(argv))
    _flush_logs()
    if stopped():
        log.info("a stop was requested: not restarting")
        return "stop requested"
    try:
        execv(argv[0], argv)
    except OSError as exc:
        reason = str(exc)
        log.error("cannot re-execute %s (%s); exiting so the service manager starts it", argv[0], reason)
        _flush_logs()
        return reason
    raise AssertionError("execv returned")  # pragma: no cover - execv never returns on success
