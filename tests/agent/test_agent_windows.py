"""The Windows helper: generated script text and the detached spawn, checked on any OS."""

import hashlib

import pytest

from agent.statefile import read_state
from agent.updater import UpdateCommand, UpdateError, Updater, windows


def test_the_script_waits_for_the_agent_then_swaps_and_restarts_the_service():
    text = windows.script_text(r"C:\ProgramData\rm\restic-manager-agent.pyz", 4242)
    lines = text.split("\r\n")
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    assert r'set "PROG=C:\ProgramData\rm\restic-manager-agent.pyz"' in lines
    assert r'set "LOG=C:\ProgramData\rm\update.log"' in lines
    assert 'tasklist /FI "PID eq 4242" /NH 2>nul | findstr /C:" 4242 " >nul' in lines
    assert "if %WAITED% geq 60 goto gaveup" in lines
    move_old = lines.index('move /y "%PROG%" "%PROG%.old" >>"%LOG%" 2>&1')
    move_new = lines.index('move /y "%PROG%.new" "%PROG%" >>"%LOG%" 2>&1')
    start = lines.index('sc start restic-manager-agent >>"%LOG%" 2>&1')
    assert lines.index(":swap") < move_old < move_new < start
    # a failed second move puts the previous program back before restarting
    assert lines[lines.index(":restore") + 1] == 'move /y "%PROG%.old" "%PROG%" >>"%LOG%" 2>&1'


@pytest.mark.parametrize("program", [r'C:\a"b\x.pyz', r"C:\a%PATH%\x.pyz", "C:\\a&b\\x.pyz"])
def test_the_script_refuses_paths_cmd_would_misread(program):
    with pytest.raises(UpdateError, match="unsafe characters"):
        windows.script_text(program, 1)


def test_start_helper_writes_the_script_and_spawns_it_detached(tmp_path):
    program = tmp_path / "restic-manager-agent.pyz"
    calls = []
    script = windows.start_helper(str(program), 77, spawn=lambda argv, **kw: calls.append((argv, kw)))
    assert script == str(tmp_path / "update.cmd")
    with open(script, newline="") as fh:
        assert fh.read() == windows.script_text(str(program), 77)
    [(argv, kwargs)] = calls
    assert argv[-3:] == ["/d", "/c", script]
    assert kwargs["creationflags"] == 0x00000008 | 0x00000200 | 0x08000000
    assert kwargs["close_fds"] is True
    assert kwargs["cwd"] == str(tmp_path)


def test_a_failed_spawn_is_an_update_error(tmp_path):
    def spawn(argv, **kw):
        raise FileNotFoundError(2, "cmd.exe not found")

    with pytest.raises(UpdateError, match="cannot start the update helper"):
        windows.start_helper(str(tmp_path / "a.pyz"), 1, spawn=spawn)


def test_the_windows_updater_stages_then_hands_over_to_the_helper(tmp_path, artifact_server):
    program = tmp_path / "restic-manager-agent.pyz"
    program.write_bytes(b"old")
    body = b"new program" * 1000
    server = artifact_server(body)
    calls = []
    updater = Updater(
        str(program),
        str(tmp_path),
        "ws://h",
        "tok",
        "1.0.0",
        os_name="nt",
        pid=4242,
        spawn=lambda argv, **kw: calls.append(argv),
        allow_unsigned=True,
    )
    cmd = UpdateCommand("job-w", "2.0.0", server.url(), hashlib.sha256(body).hexdigest(), len(body))
    phases = []
    updater.run(cmd, lambda phase, done, total: phases.append(phase))
    # the running program is left alone; the helper swaps after the agent exits
    assert program.read_bytes() == b"old"
    assert (tmp_path / "restic-manager-agent.pyz.new").read_bytes() == body
    assert "PID eq 4242" in (tmp_path / "update.cmd").read_text()
    assert len(calls) == 1
    assert phases[-1] == "restarting"
    assert read_state(str(tmp_path))["outcome"] == "swapped"


def test_a_failed_windows_hand_over_removes_the_staged_file_and_state(tmp_path, artifact_server):
    program = tmp_path / "restic-manager-agent.pyz"
    program.write_bytes(b"old")
    body = b"new"
    server = artifact_server(body)

    def spawn(argv, **kw):
        raise OSError("no")

    updater = Updater(
        str(program), str(tmp_path), "ws://h", "tok", "1.0.0", os_name="nt", spawn=spawn, allow_unsigned=True
    )
    cmd = UpdateCommand("job-w", "2.0.0", server.url(), hashlib.sha256(body).hexdigest(), len(body))
    with pytest.raises(UpdateError, match="cannot start the update helper"):
        updater.run(cmd, lambda *a: None)
    assert not (tmp_path / "restic-manager-agent.pyz.new").exists()
    state = read_state(str(tmp_path))  # the hand-over failed: on record for the next hello
    assert state["outcome"] == "failed" and "cannot start the update helper" in state["error"]
