"""``restic-manager demo``: everything a first look needs, on the embedded SQLite default.

Migrates the database, creates an ``admin`` account (its password printed once), enrols a host
``demo-agent``, builds that host's agent as an older version (so it shows as behind and the
"Update agent" button has something to do), and serves with that agent running locally under a
small loop that restarts it when it exits — what systemd's ``Restart=always`` does.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

import sqlalchemy as sa
from flask import Flask

from .extensions import db

DEMO_HOST = "demo-agent"


def _ensure_admin() -> str:
    from .models import User

    if db.session.scalar(sa.select(User).where(User.role == "admin")):
        return (
            "login: an admin account already exists (its password was printed on the first run; "
            "reset it with `restic-manager users set-password admin`)"
        )
    password = secrets.token_urlsafe(12)
    User.create("admin", password, "admin", actor="demo")
    db.session.commit()
    return f"login: admin / {password}   (shown once; change it with `restic-manager users set-password admin`)"


def _ensure_demo_key(app: Flask) -> str:
    """Use (or create) a demo release key in the instance folder; return the public key to pin.

    A real deployment keeps its release key offline and signs with ``build-agent --sign-key``;
    the demo signs on the server so that one command shows the whole signed update.
    """
    from agent.signing import generate_keypair, public_key_from_private

    path = app.config.get("RELEASE_SIGNING_KEY") or os.path.join(app.instance_path, "demo-release-key.pem")
    if not os.path.exists(path):
        pem, _ = generate_keypair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    app.config["RELEASE_SIGNING_KEY"] = path
    with open(path, "rb") as f:
        return public_key_from_private(f.read())


def _ensure_demo_host(app: Flask, agent_dir: str, agent_port: int, public_key: str) -> str:
    """Enrol (or re-key) the demo host and write its agent config; return the config path."""
    from .models import AuditEvent, Host

    host = db.session.scalar(sa.select(Host).where(Host.name == DEMO_HOST))
    if host is None:
        host, token = Host.enrol(DEMO_HOST)
        db.session.flush()
        AuditEvent.record("demo", "host.enrolled", DEMO_HOST, host_id=host.id)
    else:
        # Only the hash of a token is stored; the demo re-keys its own host on every start.
        token = host.rotate_token()
    db.session.commit()
    host_addr, _ = app.config["AGENT_ADDR"]
    os.makedirs(agent_dir, exist_ok=True)
    path = os.path.join(agent_dir, "agent.toml")
    with open(path, "w") as f:
        f.write(
            f'server_url = "ws://{host_addr}:{agent_port}"\ntoken = "{token}"\nrelease_public_key = "{public_key}"\n'
        )
    os.chmod(path, 0o600)
    return path


class AgentLoop:
    """Keep the demo agent running: start it again whenever it exits, as ``Restart=always`` does.

    The agent finishes an update by re-executing the new program in place, and exits for a restart
    only when that fails or it crashes, so the demo needs this; it is all the demo needs (tests and
    benchmarks use ``tests/support/supervisor.py``).
    """

    def __init__(self, cmd: list[str], cwd: str, log_path: str, restart_s: float = 0.1):
        self.cmd, self.cwd, self.log_path, self.restart_s = cmd, cwd, log_path, restart_s
        self._lock = threading.Lock()  # orders a start against stop(): no child is started after it
        self._stopped = False
        self._child: subprocess.Popen | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="demo-agent", daemon=True).start()

    def _run(self) -> None:
        with open(self.log_path, "ab", buffering=0) as log:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    self._child = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
                self._child.wait()
                time.sleep(self.restart_s)  # systemd's default RestartSec

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop restarting; SIGTERM the running agent (SIGKILL after ``timeout_s``)."""
        with self._lock:
            self._stopped = True
            child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run_demo(app: Flask, agent_version: str) -> int:
    import flask_migrate

    from agent.build import build_agent
    from agent.version import compare_versions

    from .serve import Servers, tune_threads, wait_for_stop_signal

    if compare_versions(agent_version, app.config["SERVER_VERSION"]) >= 0:
        print(
            f"warning: the demo agent's version {agent_version} is not older than the server's "
            f"{app.config['SERVER_VERSION']}; it will not show as behind (pass --agent-version)",
            file=sys.stderr,
        )
    agent_dir = os.path.join(app.instance_path, "demo-agent")
    with app.app_context():
        flask_migrate.upgrade()
        login_line = _ensure_admin()
        db.session.remove()
    program = os.path.join(agent_dir, "restic-manager-agent.pyz")
    if not os.path.exists(program):
        built = build_agent(agent_version, agent_dir)
        os.replace(built.path, program)

    public_key = _ensure_demo_key(app)
    app.config["BUILD_AGENT_ON_START"] = True
    tune_threads(app.config["THREAD_STACK_KIB"])
    servers = Servers(app)
    servers.start()
    with app.app_context():
        config_path = _ensure_demo_host(app, agent_dir, servers.agent_port, public_key)
        db.session.remove()
    agent = AgentLoop(
        [sys.executable, program, "--config", config_path], cwd=agent_dir, log_path=os.path.join(agent_dir, "agent.log")
    )
    agent.start()
    host, _ = app.config["HTTP_ADDR"]
    print(f"restic-manager {app.config['SERVER_VERSION']} is running", flush=True)
    print(f"  open:   http://{host}:{servers.admin_port}/", flush=True)
    print(f"  {login_line}", flush=True)
    print(f"  demo agent: {program} (log: {agent_dir}/agent.log)", flush=True)
    print("  Ctrl-C stops the server and the demo agent.", flush=True)

    wait_for_stop_signal()
    agent.stop()
    servers.stop()
    return 0
