"""The POSIX swap: keep the current program as ``.old``, then one atomic rename of ``.new``."""

from __future__ import annotations

import logging
import os
import shutil

from agent.statefile import fsync_dir
from agent.updater import UpdateError

log = logging.getLogger("agent.updater")


def keep_old(program: str) -> None:
    """Copy ``program`` to ``.old`` through ``.old.tmp``, so ``.old`` is always whole."""
    old, old_tmp = program + ".old", program + ".old.tmp"
    try:
        # copy, not rename: the program path must exist at every instant, and .old must be whole
        shutil.copyfile(program, old_tmp)
        shutil.copymode(program, old_tmp)
        with open(old_tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(old_tmp, old)
    except OSError as exc:
        try:
            os.remove(old_tmp)
        except FileNotFoundError:
            pass
        raise UpdateError(f"cannot keep the current program as {old}: {exc}") from exc


def replace(program: str, staged: str) -> None:
    """One atomic rename of the verified ``staged`` file over ``program``, then fsync the directory."""
    directory = os.path.dirname(program)
    try:
        os.replace(staged, program)
    except OSError as exc:
        raise UpdateError(f"cannot replace {program}: {exc}") from exc
    try:
        fsync_dir(directory)
    except OSError as exc:  # the rename happened; durability is best effort from here on
        log.warning("cannot fsync %s after the swap: %s", directory, exc)
