"""The systemd unit and the install script a host runs to enrol."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess

import pytest
import requests

from tests.support.live import ROOT, LiveServer

UNIT = os.path.join(ROOT, "scripts", "systemd", "restic-manager-agent.service")
INSTALL = os.path.join(ROOT, "scripts", "install-agent.sh")

pytestmark = pytest.mark.timeout(60)


def unit_service_section():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNIT)
    return cp["Service"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (scripts/test installs it)"
)
def test_the_unit_passes_systemd_analyze_verify():
    r = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def _syscalls(group: str, seen: set[str]) -> set[str]:
    """The system calls a ``SystemCallFilter=`` group allows, nested groups expanded (systemd's own table)."""
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    calls: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        name = line.strip()
        if name.startswith("@"):
            calls |= _syscalls(name, seen)
        elif name and not name.startswith("#"):
            calls.add(name)
    return calls


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (scripts/test installs it)"
)
def test_the_units_syscall_filter_lets_the_agent_restart_in_place():
    # The agent re-executes itself after a swap (agent/reexec.py). A filter without execve would not
    # make the exec fail gracefully: systemd's default action kills the process with SIGSYS.
    allowed: set[str] = set()
    for group in unit_service_section()["SystemCallFilter"].split():
        allowed |= _syscalls(group, set())
    assert "execve" in allowed
    assert unit_service_section()["RestartSec"] == "2"  # crashes keep the 2 s delay (docs/agent.md)


def test_the_unit_keeps_protect_system_strict_with_only_the_state_directory_writable():
    svc = unit_service_section()
    assert svc["ProtectSystem"] == "strict"
    assert svc["StateDirectory"] == "restic-manager-agent"
    assert "ReadWritePaths" not in svc
    assert svc["Restart"] == "always"
    assert "/var/lib/restic-manager-agent/restic-manager-agent.pyz" in svc["ExecStart"]


def test_the_install_script_is_valid_posix_sh():
    assert subprocess.run(["sh", "-n", INSTALL], timeout=10).returncode == 0


def test_the_install_script_downloads_verifies_and_configures_the_agent(app, cast, tmp_path):
    from app.updates import releases

    app.config["BUILD_AGENT_ON_START"] = True
    with LiveServer(app) as live:
        rel = releases.current_release()
        assert requests.get(live.agent_http_url + "/agent/install.sh", timeout=5).text.startswith("#!/bin/sh")
        calls = tmp_path / "systemctl.log"
        fake_systemctl = tmp_path / "systemctl"
        fake_systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
        fake_systemctl.chmod(0o755)
        env = {
            **os.environ,
            "RM_AGENT_STATE_DIR": str(tmp_path / "state"),
            "RM_AGENT_CONF_DIR": str(tmp_path / "etc"),
            "RM_AGENT_UNIT_PATH": str(tmp_path / "unit.service"),
            "RM_AGENT_SYSTEMCTL": str(fake_systemctl),
        }
        script = requests.get(live.agent_http_url + "/agent/install.sh", timeout=5).text
        r = subprocess.run(
            ["sh", "-s", "--", "--server", live.agent_ws_url, "--token", cast.host_online_token],
            input=script,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        program = tmp_path / "state" / "restic-manager-agent.pyz"
        assert releases.sha256_of(str(program)) == rel.sha256
        conf = (tmp_path / "etc" / "agent.toml").read_text()
        assert f'token = "{cast.host_online_token}"' in conf and live.agent_ws_url in conf
        assert (tmp_path / "etc" / "agent.toml").stat().st_mode & 0o077 == 0
        assert (tmp_path / "unit.service").read_text() == open(UNIT).read()
        assert calls.read_text().splitlines() == [
            "daemon-reload",
            "enable --now restic-manager-agent.service",
            "restart restic-manager-agent.service",
        ]

        r = subprocess.run(
            ["sh", "-s", "--", "--server", live.agent_ws_url, "--token", "wrong"],
            input=script,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 and "download failed" in r.stderr


def test_the_install_script_pins_a_server_ca_for_a_tls_agent_plane(app, cast, tmp_path, pki):
    from agent.config import load_config
    from app.updates import releases

    app.config.update(BUILD_AGENT_ON_START=True, AGENT_TLS_CERT=pki.server.cert, AGENT_TLS_KEY=pki.server.key)
    with LiveServer(app) as live:
        rel = releases.current_release()
        assert live.agent_ws_url.startswith("wss://")
        script = requests.get(live.agent_http_url + "/agent/install.sh", verify=pki.ca, timeout=5).text
        fake_systemctl = tmp_path / "systemctl"
        fake_systemctl.write_text("#!/bin/sh\nexit 0\n")
        fake_systemctl.chmod(0o755)

        def install(*args, where="ok"):
            env = {
                **os.environ,
                "RM_AGENT_STATE_DIR": str(tmp_path / where / "state"),
                "RM_AGENT_CONF_DIR": str(tmp_path / where / "etc"),
                "RM_AGENT_UNIT_PATH": str(tmp_path / where / "unit.service"),
                "RM_AGENT_SYSTEMCTL": str(fake_systemctl),
            }
            cmd = ["sh", "-s", "--", "--server", live.agent_ws_url, "--token", cast.host_online_token, *args]
            return subprocess.run(cmd, input=script, env=env, capture_output=True, text=True, timeout=30)

        r = install("--server-ca", pki.ca)
        assert r.returncode == 0, r.stderr
        state = tmp_path / "ok" / "state"
        assert releases.sha256_of(str(state / "restic-manager-agent.pyz")) == rel.sha256
        assert (state / "server-ca.pem").read_bytes() == open(pki.ca, "rb").read()
        cfg = load_config(str(tmp_path / "ok" / "etc" / "agent.toml"))  # the agent accepts what was written
        assert cfg.server_ca == str(state / "server-ca.pem") and cfg.server_url == live.agent_ws_url

        # Another CA pinned: the download is refused, nothing is installed.
        r = install("--server-ca", pki.other_ca, where="mitm")
        assert r.returncode != 0 and "download failed" in r.stderr
        assert not (tmp_path / "mitm" / "state" / "restic-manager-agent.pyz").exists()
        assert not (tmp_path / "mitm" / "etc" / "agent.toml").exists()

        r = install("--server-ca", str(tmp_path / "missing.pem"), where="missing")
        assert r.returncode != 0 and "no such readable file" in r.stderr
