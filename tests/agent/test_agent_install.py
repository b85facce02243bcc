"""install-agent.sh against a tiny local server: it installs the guard and pins the release key."""

import configparser
import hashlib
import http.server
import os
import subprocess
import threading

import pytest

from agent.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL = os.path.join(ROOT, "scripts", "install-agent.sh")
UNIT = os.path.join(ROOT, "scripts", "systemd", "restic-manager-agent.service")
GUARD = os.path.join(ROOT, "scripts", "systemd", "restic-manager-agent-guard")


@pytest.fixture
def agent_site(agent_builds, release_key):
    """Serve /agent/download/current (with checksum and release key headers) and the unit file."""
    with open(agent_builds["1.0.0"].path, "rb") as fh:
        body = fh.read()
    with open(UNIT, "rb") as fh:
        unit = fh.read()
    send_key = {"on": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = {"/agent/download/current": body, "/agent/restic-manager-agent.service": unit}.get(self.path)
            if data is None or self.headers.get("Authorization") not in ("Bearer tok", None):
                self.send_response(404 if data is None else 401)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Checksum-Sha256", hashlib.sha256(data).hexdigest())
            if send_key["on"]:
                self.send_header("X-Release-Public-Key", release_key[1])
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"ws://127.0.0.1:{httpd.server_address[1]}", send_key
    httpd.shutdown()
    httpd.server_close()


def install(tmp_path, server, *extra):
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {
        **os.environ,
        "RM_AGENT_STATE_DIR": str(tmp_path / "state"),
        "RM_AGENT_CONF_DIR": str(tmp_path / "etc"),
        "RM_AGENT_UNIT_PATH": str(tmp_path / "unit.service"),
        "RM_AGENT_SYSTEMCTL": str(fake),
    }
    args = ["sh", INSTALL, "--server", server, "--token", "tok", *extra]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def test_it_installs_the_guard_and_pins_the_servers_release_key(tmp_path, agent_site, release_key):
    r = install(tmp_path, agent_site[0])
    assert r.returncode == 0, r.stderr
    guard = tmp_path / "state" / "restic-manager-agent-guard"
    with open(GUARD, "rb") as fh:
        assert guard.read_bytes() == fh.read()
    assert os.access(guard, os.X_OK)
    config = load_config(str(tmp_path / "etc" / "agent.toml"))
    assert config.release_public_key == release_key[1] and not config.allow_unsigned_updates


def test_an_explicit_key_wins_and_without_any_key_it_warns(tmp_path, agent_site):
    url, send_key = agent_site
    send_key["on"] = False
    r = install(tmp_path, url)
    assert r.returncode == 0 and "will not update itself" in r.stderr
    assert not load_config(str(tmp_path / "etc" / "agent.toml")).updates_allowed
    r = install(tmp_path, url, "--allow-unsigned")
    assert r.returncode == 0 and "WARNING" in r.stderr
    assert load_config(str(tmp_path / "etc" / "agent.toml")).allow_unsigned_updates
    r = install(tmp_path, url, "--release-key", "bad key;")
    assert r.returncode != 0 and "must be base64" in r.stderr


def test_the_unit_runs_the_guard_before_every_start():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNIT)
    pre = cp["Service"]["ExecStartPre"]
    assert pre.startswith("-/bin/sh /var/lib/restic-manager-agent/restic-manager-agent-guard")
    # four starts (three failed ones, then the guard's rollback) fit in the start limit
    assert int(cp["Unit"]["StartLimitBurst"]) > 4
