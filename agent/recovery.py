"""Commit or roll back, crash-safely: start-up repair, rollback, commit and the sh guard.

After a swap the new program is *on probation*. The marker ``probation.json`` in the state
directory (read and written through :mod:`agent.statefile`) is written atomically before the
swap's final rename and says which job swapped which version for which. The new program commits
(removes the marker, ``update-state.json`` outcome ``committed``) once the server has welcomed it;
until then ``.old`` is kept. If it is not welcomed within ``probation_s``, or it keeps failing to
start, the previous program is restored from ``.old``, and the restored program reports
``rolled_back`` in its next hello.

Start-up repair (:func:`repair`, run by the agent before it connects; the POSIX sh guard
``scripts/systemd/restic-manager-agent-guard`` does the file part before every start under
systemd, because a broken new program may never get this far) makes any interrupted update safe:

* a leftover ``.new`` or ``.old.tmp`` is deleted (the download or copy was interrupted);
* a missing program with ``.old`` present gets ``.old`` back;
* a marker naming another version than the running one is stale: its outcome is recorded
  (``rolled_back`` with the reason, or ``failed`` when the swap never happened) and it is removed;
* ``update-state.json`` still saying ``started`` (the agent died mid-update) becomes ``failed``.

Marker format (JSON, one key per line so the sh guard can edit it with sed)::

    {"attempts": 0, "from_version": "1.0.0", "job_id": "…", "rollback": null,
     "started_at": 1712345678.5, "starts": 0, "to_sha256": "…", "to_version": "2.0.0"}

``attempts`` is counted by the sh guard, ``starts`` by the agent itself (so the two never count
one start twice: rollback happens when either exceeds the limit); ``rollback`` is null or the reason
a rollback was started. ``started_at`` is wall-clock seconds (it must survive restarts).

The watchdog that commits on the first welcome or rolls back at the deadline is
:mod:`agent.probation`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from agent.statefile import (
    OUTCOME_STARTED,
    fsync_dir,
    marker_path,
    now_iso,
    read_marker,
    read_state,
    remove_marker,
    write_atomic,
    write_marker,
    write_state,
)

log = logging.getLogger("agent.recovery")

GUARD_FILE = "restic-manager-agent-guard"
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_ENV = "RM_AGENT_GUARD_MAX_ATTEMPTS"


def max_attempts() -> int:
    value = os.environ.get(MAX_ATTEMPTS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_ATTEMPTS


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- the guard in Python


@dataclass
class RepairResult:
    """What start-up repair decided: ``run`` normally, ``probation`` (with the marker), or ``restart``."""

    action: str
    marker: dict | None = None
    notes: tuple[str, ...] = ()


def repair(program: str, state_dir: str, running_version: str, limit: int | None = None) -> RepairResult:
    """Repair any half-finished update before the agent connects; see the module docstring.

    ``restart`` means a rollback was carried out (the previous program is back in place) and the
    process must exit so the service manager starts it.
    """
    limit = limit or max_attempts()
    notes: list[str] = []
    directory = os.path.dirname(program)
    for leftover in (program + ".new", program + ".old.tmp", marker_path(state_dir) + ".tmp"):
        if _remove(leftover):
            notes.append(f"removed leftover {os.path.basename(leftover)}")
    if not os.path.exists(program) and os.path.exists(program + ".old"):
        os.replace(program + ".old", program)
        fsync_dir(directory)
        notes.append("restored the missing program from .old")
    for note in notes:
        log.warning("start-up repair: %s", note)

    marker = read_marker(state_dir)
    state = read_state(state_dir) or {}
    if marker == {}:  # unreadable: we cannot tell what it meant; do not guess a rollback
        remove_marker(state_dir)
        marker = None
    if marker is None:
        if state.get("outcome") == OUTCOME_STARTED:
            _record(state_dir, state, "failed", _interrupted(state.get("version"), running_version))
        return RepairResult("run", notes=tuple(notes))

    to_version = marker.get("to_version")
    if running_version != to_version:
        # stale: the new program is not what runs. Record why, then forget the marker.
        attempts = max(_int(marker.get("attempts")), _int(marker.get("starts")))
        if marker.get("rollback"):
            outcome, error = "rolled_back", str(marker["rollback"])
        elif attempts > limit:
            outcome, error = "rolled_back", _crash_loop(to_version, attempts - 1)
        else:
            outcome, error = "failed", _interrupted(to_version, running_version)
        _record(state_dir, _state_from_marker(marker), outcome, error)
        remove_marker(state_dir)
        log.warning("update job %s to %s: %s (%s)", marker.get("job_id"), to_version, outcome, error)
        return RepairResult("run", notes=tuple(notes))

    if marker.get("rollback"):  # a rollback was started and interrupted: finish it
        return RepairResult("restart" if roll_back(program, state_dir, marker, marker["rollback"]) else "run")

    marker["starts"] = _int(marker.get("starts")) + 1
    if max(marker["starts"], _int(marker.get("attempts"))) > limit:
        reason = _crash_loop(to_version, max(marker["starts"], _int(marker.get("attempts"))) - 1)
        return RepairResult("restart" if roll_back(program, state_dir, marker, reason) else "run")
    write_marker(state_dir, marker)
    # the hello must say "swapped" for this job even if we died before recording it
    if state.get("job_id") != marker.get("job_id") or state.get("outcome") not in ("swapped", "committed"):
        write_state(state_dir, {**_state_from_marker(marker), "outcome": "swapped", "error": None, "reported": False})
    return RepairResult("probation", marker=marker, notes=tuple(notes))


def roll_back(program: str, state_dir: str, marker: dict, reason: str) -> bool:
    """Restore ``.old`` over the program under probation; return False if there is nothing to restore.

    Order, each step durable before the next: the reason goes into the marker; ``.old`` is
    renamed over the program (atomic); the directory is fsynced; the outcome is recorded in
    ``update-state.json``; the marker is removed. A crash between any two steps is finished by
    the next start's :func:`repair` (or the sh guard).
    """
    old = program + ".old"
    log.error("rolling back update job %s: %s", marker.get("job_id"), reason)
    if not os.path.exists(old):
        error = f"{reason}; cannot roll back: {old} is missing, keeping version {marker.get('to_version')}"
        log.error("%s", error)
        write_state(state_dir, {**_state_from_marker(marker), "outcome": "failed", "error": error, "reported": False})
        remove_marker(state_dir)
        return False
    marker = {**marker, "rollback": reason}
    write_marker(state_dir, marker)
    os.replace(old, program)
    fsync_dir(os.path.dirname(program))
    write_state(state_dir, {**_state_from_marker(marker), "outcome": "rolled_back", "error": reason, "reported": False})
    remove_marker(state_dir)
    return True


def count_unguarded_start(state_dir: str) -> bool:
    """Count a start the sh guard will not see (a re-exec in place) in the marker's ``attempts``.

    Only while a program is on probation and no rollback is under way; return True if counted.
    The started program's own :func:`repair` counts ``starts`` as usual (the larger count decides).
    """
    marker = read_marker(state_dir)
    if not marker or marker.get("rollback"):
        return False
    write_marker(state_dir, {**marker, "attempts": _int(marker.get("attempts")) + 1})
    return True


def commit(state_dir: str, marker: dict) -> None:
    """The server welcomed the new program: record ``committed`` and end the probation."""
    write_state(
        state_dir,
        {**_state_from_marker(marker), "outcome": "committed", "error": None, "reported": True},
    )
    remove_marker(state_dir)
    log.info("update job %s: version %s committed", marker.get("job_id"), marker.get("to_version"))


def probation_remaining(marker: dict, probation_s: float, now: float | None = None) -> float:
    """Seconds of probation left; a wall clock that went backwards cannot extend it past ``probation_s``."""
    now = time.time() if now is None else now
    started = marker.get("started_at")
    started = float(started) if isinstance(started, (int, float)) and not isinstance(started, bool) else now
    return min(started, now) + probation_s - now


# --------------------------------------------------------------------------- the sh guard's text


def guard_text() -> bytes | None:
    """Return the sh guard shipped in the zipapp (``agent/guard.sh``), or the source tree's copy."""
    import pkgutil

    try:
        data = pkgutil.get_data("agent", "guard.sh")
        if data:
            return data
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "scripts", "systemd", GUARD_FILE)
    try:
        with open(source, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def install_guard(directory: str) -> str:
    """Write the sh guard into ``directory`` (atomically, mode 0755) unless it is already current."""
    text = guard_text()
    if text is None:
        raise OSError("this agent build carries no guard script")
    path = os.path.join(directory, GUARD_FILE)
    try:
        with open(path, "rb") as fh:
            if fh.read() == text:
                return path
    except OSError:
        pass
    write_atomic(path, text, mode=0o755)
    return path


# --------------------------------------------------------------------------- helpers


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _crash_loop(version, starts: int) -> str:
    return f"new version {version} crash-looped: {starts} starts without reaching the server"


def _interrupted(version, running_version: str) -> str:
    return (
        f"the update to {version} was interrupted before the new program took over; "
        f"the agent restarted at version {running_version}"
    )


def _state_from_marker(marker: dict) -> dict:
    return {
        "job_id": marker.get("job_id"),
        "version": marker.get("to_version"),
        "from_version": marker.get("from_version"),
        "at": now_iso(),
    }


def _record(state_dir: str, state: dict, outcome: str, error: str) -> None:
    write_state(state_dir, {**state, "outcome": outcome, "error": error, "reported": False, "at": now_iso()})
