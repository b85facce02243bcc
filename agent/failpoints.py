"""Test-only fault injection: ``RM_AGENT_FAILPOINT=<step>`` makes the agent SIGKILL itself at that step.

Each step fires once per state directory (a ``failpoint-<step>.hit`` file remembers it fired), so
the restarted agent runs past it. The fault tests (``tests/agent/test_agent_faults.py``) kill the
agent at every step of an update and check that the next start finishes or undoes it.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("agent.failpoints")

FAILPOINT_ENV = "RM_AGENT_FAILPOINT"
FAILPOINTS = ("after_download", "after_old", "between_renames", "after_swap", "before_reexec", "before_welcome_commit")


def failpoint(name: str, state_dir: str) -> None:
    """Kill this process with SIGKILL if ``RM_AGENT_FAILPOINT`` names ``name`` (tests only)."""
    if os.environ.get(FAILPOINT_ENV) != name:
        return
    hit = os.path.join(state_dir, f"failpoint-{name}.hit")
    if os.path.exists(hit):
        return
    with open(hit, "w", encoding="ascii") as fh:
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("failpoint %s: killing the agent (pid %d) with SIGKILL", name, os.getpid())
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    time.sleep(5)  # SIGKILL is not instantaneous; never run past the failpoint
