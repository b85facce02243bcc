"""Restart in place (agent/reexec.py): a real ``execv`` in a child process keeps the PID, the
interpreter options and the program arguments, passes no descriptor but stdio, counts the start
for the guard, and falls back to an exit when the exec fails."""

import json
import os
import subprocess
import sys

from agent import recovery, reexec, statefile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The "new program": reports what it inherited from the process that exec'd it.
NEW_PROGRAM = """\
import json, os, sys
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass  # the listdir's own descriptor, already closed
print(json.dumps({"pid": os.getpid(), "orig_argv": sys.orig_argv, "argv": sys.argv, "fds": fds,
                  "isolated": sys.flags.isolated, "env": os.environ.get("RM_REEXEC_PROBE")}))
"""

# The "old agent": opens an inheritable pipe and a socket, then restarts in place into the new program.
OLD_AGENT = """\
import json, os, socket, sys
sys.path.insert(0, {root!r})
from agent import reexec
r, w = os.pipe()
os.set_inheritable(r, True)  # as if a library had made one inheritable
sock = socket.socket()
leaky = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in (r, w, sock.fileno())]
sys.stdout.write(json.dumps({{"pid": os.getpid(), "leaky": leaky}}) + "\\n")
sys.stdout.flush()
if len(sys.argv) > 3 and sys.argv[3] == "--broken-interpreter":
    sys.executable = "/nonexistent/python3"
reason = reexec.restart_in_place({program!r}, {state_dir!r})
print(json.dumps({{"exec_failed": reason}}))
"""


def run_old_agent(tmp_path, *extra):
    program = tmp_path / "restic-manager-agent.pyz"
    program.write_text(NEW_PROGRAM)
    script = tmp_path / "old_agent.py"
    script.write_text(OLD_AGENT.format(root=ROOT, program=str(program), state_dir=str(tmp_path)))
    env = {**os.environ, "RM_REEXEC_PROBE": "kept"}
    env.pop("RM_AGENT_FAILPOINT", None)
    out = subprocess.run(
        [sys.executable, "-I", str(script), "--config", "agent.toml", *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def test_the_command_line_keeps_the_interpreter_its_options_and_the_arguments():
    argv = reexec.reexec_argv(
        "/var/lib/rm/restic-manager-agent.pyz",
        argv=["restic-manager-agent.pyz", "--config", "/etc/rm/agent.toml"],
        orig_argv=["python3", "-I", "-X", "faulthandler", "restic-manager-agent.pyz", "--config", "/etc/rm/agent.toml"],
        executable="/usr/bin/python3",
    )
    assert argv == [
        "/usr/bin/python3",
        "-I",
        "-X",
        "faulthandler",
        "/var/lib/rm/restic-manager-agent.pyz",
        "--config",
        "/etc/rm/agent.toml",
    ]
    # started by its shebang / without options: nothing to carry over
    plain = reexec.reexec_argv(
        "/p.pyz",
        argv=["/p.pyz", "--config", "c"],
        orig_argv=["python3", "/p.pyz", "--config", "c"],
        executable="/usr/bin/python3",
    )
    assert plain == ["/usr/bin/python3", "/p.pyz", "--config", "c"]


def test_a_real_exec_keeps_the_pid_and_arguments_and_leaks_no_descriptor(tmp_path):
    statefile.write_marker(str(tmp_path), statefile.new_marker("job-x", "1.0.0", "2.0.0", "ab" * 32))
    (before, after), log = run_old_agent(tmp_path)
    assert after["pid"] == before["pid"]  # replaced in place: the service manager sees one process
    assert after["isolated"] == 1 and after["orig_argv"][1] == "-I"
    assert after["argv"] == [str(tmp_path / "restic-manager-agent.pyz"), "--config", "agent.toml"]
    assert after["env"] == "kept"
    # only stdio crossed the exec: not the inheritable pipe, not the socket
    assert before["leaky"][0].startswith("pipe:[") and before["leaky"][2].startswith("socket:[")
    assert not set(before["leaky"]) & set(after["fds"].values()), after["fds"]
    assert sorted(int(fd) for fd in after["fds"] if int(fd) > 2) == [], after["fds"]
    # this start bypassed the guard, so it was counted for it
    assert statefile.read_marker(str(tmp_path))["attempts"] == 1


def test_a_failed_exec_returns_the_reason_so_the_agent_exits_for_the_service_manager(tmp_path):
    (before, after), log = run_old_agent(tmp_path, "--broken-interpreter")
    assert "No such file or directory" in after["exec_failed"]
    assert "cannot re-execute /nonexistent/python3" in log and "exiting so the service manager starts it" in log


def test_only_a_pending_probation_counts_the_unguarded_start(tmp_path):
    state = str(tmp_path)
    assert recovery.count_unguarded_start(state) is False  # no update in flight
    marker = statefile.new_marker("job-x", "1.0.0", "2.0.0", "ab" * 32)
    statefile.write_marker(state, {**marker, "rollback": "new version 2.0.0 crash-looped"})
    assert recovery.count_unguarded_start(state) is False  # a rollback is under way: it is not a start of 2.0.0
    statefile.write_marker(state, {**marker, "attempts": 2})
    assert recovery.count_unguarded_start(state) is True
    assert statefile.read_marker(state)["attempts"] == 3


def test_a_stop_that_came_in_meanwhile_wins_over_the_exec(tmp_path):
    calls = []
    reason = reexec.restart_in_place(
        str(tmp_path / "restic-manager-agent.pyz"),
        str(tmp_path),
        stopped=lambda: True,
        execv=lambda *a: calls.append(a),
    )
    assert reason == "stop requested" and calls == []
