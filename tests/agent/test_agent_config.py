"""Config parsing, and the agent's one-line exit on a bad config file."""

import os
import subprocess
import sys

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.daemon import EX_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, text, name="agent.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_it_loads_a_minimal_config(tmp_path):
    cfg = load_config(write(tmp_path, 'server_url = "ws://127.0.0.1:8081/"\ntoken = "abc"\n'))
    assert cfg.server_url == "ws://127.0.0.1:8081"
    assert cfg.ws_url == "ws://127.0.0.1:8081/ws/agent"
    assert cfg.token == "abc"
    assert cfg.heartbeat_s is None
    assert cfg.backoff_max_s == 10
    assert cfg.log_level == "INFO"
    assert cfg.restart_mode == "exec"  # re-execute the swapped-in program in place (agent/reexec.py)
    # run from source, the state lives beside the config file
    assert cfg.state_dir == str(tmp_path)


def test_it_reads_every_optional_key(tmp_path):
    text = (
        'server_url = "wss://rm.example.org"\ntoken = "abc"\nheartbeat_s = 5\n'
        'backoff_max_s = 12.5\nstate_dir = "state"\nlog_level = "debug"\nrestart_mode = "Exit"\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.restart_mode == "exit"
    assert (cfg.heartbeat_s, cfg.backoff_max_s, cfg.log_level) == (5.0, 12.5, "DEBUG")
    assert cfg.state_dir == str(tmp_path / "state")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"token": "t"}, "missing required key 'server_url'"),
        ({"server_url": "ws://h"}, "missing required key 'token'"),
        ({"server_url": "http://h", "token": "t"}, "must start with ws:// or wss://"),
        ({"server_url": "ws://", "token": "t"}, "no valid host"),
        ({"server_url": "ws://h:99999", "token": "t"}, "no valid host or port"),
        ({"server_url": "ws://u:p@h", "token": "t"}, "must not carry credentials"),
        ({"server_url": 5, "token": "t"}, "'server_url' must be a string"),
        ({"server_url": "ws://h", "token": ""}, "'token' must not be empty"),
        ({"server_url": "ws://h", "token": "a b"}, "whitespace"),
        ({"server_url": "ws://h", "token": "t", "heartbeat_s": True}, "'heartbeat_s' must be a number"),
        ({"server_url": "ws://h", "token": "t", "heartbeat_s": 0}, "between"),
        ({"server_url": "ws://h", "token": "t", "backoff_max_s": "30"}, "'backoff_max_s' must be a number"),
        ({"server_url": "ws://h", "token": "t", "log_level": "LOUD"}, "'log_level' must be one of"),
        ({"server_url": "ws://h", "token": "t", "server-url": "x"}, "unknown key 'server-url'"),
        ({"server_url": "ws://h", "token": "t", "restart_mode": "fork"}, "'restart_mode' must be one of exec, exit"),
        ({"server_url": "ws://h", "token": "t", "restart_mode": 1}, "'restart_mode' must be a string"),
    ],
)
def test_it_rejects_bad_values_with_a_clear_message(raw, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, "/etc/rm/agent.toml")
    assert str(exc.value).startswith("/etc/rm/agent.toml: ")
    assert message in str(exc.value)


def run_agent(*args):
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "file not found"),
        ("server_url = ", "invalid TOML"),
        ('token = "abc"\n', "missing required key 'server_url'"),
        ('server_url = "https://h"\ntoken = "abc"\n', "must start with ws:// or wss://"),
    ],
)
def test_the_agent_exits_with_one_line_on_a_bad_config(tmp_path, text, message):
    path = str(tmp_path / "agent.toml") if text is None else write(tmp_path, text)
    proc = run_agent("--config", path)
    assert proc.returncode == EX_CONFIG
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"restic-manager-agent: config error: {path}: ")
    assert message in lines[0]


def test_the_agent_requires_a_config_argument():
    proc = run_agent()
    assert proc.returncode != 0
    assert "--config" in proc.stderr


def test_server_ca_is_resolved_beside_the_config_and_loaded(tmp_path, pki):
    import shutil

    shutil.copyfile(pki.ca, tmp_path / "server-ca.pem")
    cfg = load_config(
        write(tmp_path, 'server_url = "wss://127.0.0.1:8081"\ntoken = "abc"\nserver_ca = "server-ca.pem"\n')
    )
    assert cfg.server_ca == str(tmp_path / "server-ca.pem")
    assert load_config(write(tmp_path, 'server_url = "wss://h"\ntoken = "abc"\n')).server_ca is None


@pytest.mark.parametrize(
    "ca, url, message",
    [
        ("missing.pem", "wss://h", "'server_ca' {dir}/missing.pem: no such file"),
        ("not-pem.pem", "wss://h", "'server_ca' {dir}/not-pem.pem: not a PEM CA certificate file"),
        (".", "wss://h", "'server_ca' {dir}: not a file"),
        ("ca.pem", "ws://h", "'server_ca' is set but 'server_url' is not wss://"),
    ],
)
def test_a_bad_server_ca_stops_the_agent_with_one_line(tmp_path, pki, ca, url, message):
    import shutil

    shutil.copyfile(pki.ca, tmp_path / "ca.pem")
    (tmp_path / "not-pem.pem").write_text("hello\n")
    path = write(tmp_path, f'server_url = "{url}"\ntoken = "abc"\nserver_ca = "{ca}"\n')
    proc = run_agent("--config", path)
    assert proc.returncode == EX_CONFIG
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert message.format(dir=tmp_path) in lines[0]
