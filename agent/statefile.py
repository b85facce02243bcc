"""The agent's files in its state folder, read and written crash-safely.

Three JSON files carry an update across restarts (their fields: ``docs/agent.md``):

* ``update-state.json`` — the last update's outcome, written by :mod:`agent.updater` and
  :mod:`agent.recovery`, read for the ``last_update`` of every hello until the server has seen it;
* ``probation.json`` — the probation marker, written before the swap's final rename and removed
  when the new program commits or is rolled back. It is one key per line because the sh guard
  (``scripts/systemd/restic-manager-agent-guard``) edits it with sed;
* ``update-jobs.json`` — the ids of the last :data:`JOB_MEMORY` update jobs the agent started,
  so a replayed ``command.update`` is recognised even by the program it swapped in.

Every write goes through :func:`write_atomic`: a temp file beside the target (``<name>.tmp``),
fsync, one ``os.replace``, fsync of the folder — so a reader, or the next start after a power
cut, sees the old content or the new, never a mix. This module imports nothing from the agent.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import time

log = logging.getLogger("agent.statefile")

STATE_FILE = "update-state.json"
MARKER_FILE = "probation.json"
JOBS_FILE = "update-jobs.json"

#: How many update job ids the agent remembers; a ``command.update`` for one of them is a replay.
JOB_MEMORY = 64

#: ``update-state.json`` outcome while an update runs (start-up repair turns a leftover one into ``failed``).
OUTCOME_STARTED = "started"

#: Versions and job ids written into the marker must be safe for the sh guard's sed.
SAFE_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,99}$")


# --------------------------------------------------------------------------- durable writes


def fsync_dir(path: str) -> None:
    """Flush a directory entry to disk so a rename survives a power cut (no-op where unsupported)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` whole: write ``<path>.tmp``, fsync, rename, fsync the folder.

    :param mode: permission bits given to the file before it takes ``path``'s place.
    """
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_json_object(path: str) -> dict | None:
    """Return the JSON object stored at ``path``, None when the file is absent.

    :raise ValueError: the file cannot be read or does not hold a JSON object.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- update-state.json


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def read_state(state_dir: str) -> dict | None:
    """Return the update state file's content, or None when absent or unreadable."""
    try:
        return read_json_object(state_path(state_dir))
    except ValueError as exc:
        log.warning("ignoring unreadable %s: %s", state_path(state_dir), exc)
        return None


def write_state(state_dir: str, state: dict) -> None:
    """Write the update state file atomically, creating the state folder if needed."""
    os.makedirs(state_dir, exist_ok=True)
    write_atomic(state_path(state_dir), (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def last_update_for_hello(state_dir: str, running_version: str) -> dict | None:
    """Return the ``last_update`` a hello should carry: the unreported outcome, or None."""
    state = read_state(state_dir)
    if not state or state.get("reported") or state.get("outcome") == OUTCOME_STARTED:
        return None  # "started" is an update still running (or one start-up repair will settle)
    outcome, error = state.get("outcome"), state.get("error")
    if outcome == "swapped" and state.get("version") != running_version:
        # the service manager started something other than what we swapped in
        outcome = "failed"
        error = f"restarted at version {running_version}, expected {state.get('version')} after the swap"
    return {
        "job_id": state.get("job_id"),
        "outcome": outcome,
        "error": error,
        "from_version": state.get("from_version"),
        "version": state.get("version"),
    }


def mark_reported(state_dir: str) -> None:
    """Record that the server has seen the last update's outcome, so later hellos omit it."""
    state = read_state(state_dir)
    if state and not state.get("reported"):
        state["reported"] = True
        write_state(state_dir, state)


# --------------------------------------------------------------------------- update-jobs.json


def jobs_path(state_dir: str) -> str:
    return os.path.join(state_dir, JOBS_FILE)


def ran_jobs(state_dir: str) -> list[str]:
    """The ids of the update jobs this agent started, oldest first (empty when unknown or unreadable)."""
    try:
        stored = read_json_object(jobs_path(state_dir)) or {}
    except ValueError as exc:
        log.warning("ignoring unreadable %s: %s", jobs_path(state_dir), exc)
        return []
    ids = stored.get("job_ids")
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def ran_job(state_dir: str, job_id: str) -> bool:
    return job_id in ran_jobs(state_dir)


def remember_job(state_dir: str, job_id: str) -> None:
    """Add ``job_id`` to the jobs this agent started, keeping the newest :data:`JOB_MEMORY`."""
    ids = [i for i in ran_jobs(state_dir) if i != job_id] + [job_id]
    os.makedirs(state_dir, exist_ok=True)
    data = json.dumps({"job_ids": ids[-JOB_MEMORY:]}, indent=0) + "\n"
    write_atomic(jobs_path(state_dir), data.encode("utf-8"))


# --------------------------------------------------------------------------- probation.json


def marker_path(state_dir: str) -> str:
    return os.path.join(state_dir, MARKER_FILE)


def new_marker(job_id: str, from_version: str, to_version: str, to_sha256: str) -> dict:
    return {
        "attempts": 0,
        "from_version": from_version,
        "job_id": job_id,
        "rollback": None,
        "started_at": time.time(),
        "starts": 0,
        "to_sha256": to_sha256,
        "to_version": to_version,
    }


def read_marker(state_dir: str) -> dict | None:
    """Return the probation marker, None when absent; an unreadable marker is returned as ``{}``."""
    try:
        return read_json_object(marker_path(state_dir))
    except ValueError as exc:
        log.error("unreadable probation marker %s: %s", marker_path(state_dir), exc)
        return {}


def write_marker(state_dir: str, marker: dict) -> None:
    """Write the marker atomically; indent=0 puts one key per line, which the sh guard's sed relies on."""
    write_atomic(marker_path(state_dir), (json.dumps(marker, indent=0, sort_keys=True) + "\n").encode("utf-8"))


def remove_marker(state_dir: str) -> None:
    try:
        os.remove(marker_path(state_dir))
    except FileNotFoundError:
        return
    fsync_dir(state_dir)
