"""The Windows swap: a running program cannot be replaced, so a detached helper does it after we exit.

The agent writes ``update.cmd`` beside the program and starts it detached (no console, its own
process group, no inherited handles), then exits. The helper waits for the agent's PID to end,
moves the program to ``.old`` and ``.new`` into place (restoring ``.old`` if the second move
fails), starts the service again and appends everything it does to ``update.log``.
"""

from __future__ import annotations

import ntpath
import os
import subprocess
from collections.abc import Callable

from agent.updater import UpdateError

SERVICE_NAME = "restic-manager-agent"
SCRIPT_NAME = "update.cmd"
LOG_NAME = "update.log"
#: How long the helper waits for the agent process to exit before giving up (seconds).
WAIT_LIMIT_S = 60

# Win32 process creation flags; spelled out so this module imports (and is tested) on Linux too.
DETACHED_PROCESS = getattr(subprocess, "DETACHED_PROCESS", 0x00000008)
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
CREATION_FLAGS = DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW


def script_text(program: str, pid: int, service: str = SERVICE_NAME, wait_limit_s: int = WAIT_LIMIT_S) -> str:
    """Return the ``update.cmd`` batch script that swaps ``program`` once process ``pid`` has exited."""
    for value in (program, service):
        if any(ch in value for ch in '"%^&|<>\r\n'):
            raise UpdateError(f"cannot write the update helper: unsafe characters in {value!r}")
    # ntpath: the script is Windows text even when generated (and tested) elsewhere
    log_path = ntpath.join(ntpath.dirname(program), LOG_NAME)
    lines = [
        "@echo off",
        "setlocal",
        f'set "PROG={program}"',
        f'set "LOG={log_path}"',
        "set /a WAITED=0",
        f'echo %DATE% %TIME% update helper: waiting for agent pid {pid} to exit>>"%LOG%"',
        ":wait",
        # the PID column is padded with spaces; matching " pid " avoids hits on other numbers
        f'tasklist /FI "PID eq {pid}" /NH 2>nul | findstr /C:" {pid} " >nul',
        "if errorlevel 1 goto swap",
        "set /a WAITED+=1",
        f"if %WAITED% geq {wait_limit_s} goto gaveup",
        # "timeout" needs a console, which a detached helper does not have; ping waits ~1 s
        "ping -n 2 127.0.0.1 >nul",
        "goto wait",
        ":gaveup",
        f'echo %DATE% %TIME% agent pid {pid} still running after {wait_limit_s} s; not swapping>>"%LOG%"',
        "exit /b 1",
        ":swap",
        'if not exist "%PROG%.new" (',
        '  echo %DATE% %TIME% %PROG%.new is missing; not swapping>>"%LOG%"',
        "  goto start",
        ")",
        'if exist "%PROG%.old" del /f /q "%PROG%.old" >>"%LOG%" 2>&1',
        'move /y "%PROG%" "%PROG%.old" >>"%LOG%" 2>&1',
        "if errorlevel 1 goto failed",
        'move /y "%PROG%.new" "%PROG%" >>"%LOG%" 2>&1',
        "if errorlevel 1 goto restore",
        'echo %DATE% %TIME% swapped in the new program>>"%LOG%"',
        "goto start",
        ":restore",
        'move /y "%PROG%.old" "%PROG%" >>"%LOG%" 2>&1',
        ":failed",
        'echo %DATE% %TIME% swap failed; keeping the previous program>>"%LOG%"',
        ":start",
        f'sc start {service} >>"%LOG%" 2>&1',
        'echo %DATE% %TIME% update helper done>>"%LOG%"',
        "exit /b 0",
    ]
    return "\r\n".join(lines) + "\r\n"


def popen_args(script: str) -> tuple[list[str], dict]:
    """Return the argv and keyword arguments that start ``script`` fully detached."""
    argv = [os.environ.get("COMSPEC", "cmd.exe"), "/d", "/c", script]
    kwargs = {
        "creationflags": CREATION_FLAGS,
        "close_fds": True,
        "cwd": os.path.dirname(script),
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }
    return argv, kwargs


def start_helper(program: str, pid: int, *, spawn: Callable | None = None, service: str = SERVICE_NAME) -> str:
    """Write ``update.cmd`` beside ``program`` and start it detached; return the script path."""
    script = os.path.join(os.path.dirname(program), SCRIPT_NAME)
    text = script_text(program, pid, service)
    try:
        with open(script, "w", encoding="ascii", newline="") as fh:
            fh.write(text)
    except (OSError, UnicodeEncodeError) as exc:
        raise UpdateError(f"cannot write {script}: {exc}") from exc
    argv, kwargs = popen_args(script)
    try:
        (spawn or subprocess.Popen)(argv, **kwargs)
    except OSError as exc:
        raise UpdateError(f"cannot start the update helper: {exc}") from exc
    return script
