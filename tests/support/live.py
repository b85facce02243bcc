"""Real servers and real agents on 127.0.0.1 ephemeral ports, for integration and end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import requests

from tests.support.supervisor import Supervisor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_release_key: tuple[str, str] | None = None
_release_key_lock = threading.Lock()


def release_key() -> tuple[str, str]:
    """The test run's release signing key: (private key PEM path, base64 public key to pin)."""
    global _release_key
    from agent.signing import generate_keypair

    with _release_key_lock:
        if _release_key is None:
            import atexit
            import tempfile

            d = tempfile.mkdtemp(prefix="rm-release-key-")
            atexit.register(shutil.rmtree, d, True)
            pem, public = generate_keypair()
            path = os.path.join(d, "release-key.pem")
            with open(path, "wb") as f:
                f.write(pem)
            _release_key = (path, public)
        return _release_key


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class LiveServer:
    """The real two-plane server (waitress + werkzeug) in this process, on ephemeral ports."""

    def __init__(self, app, scheduler: bool = False):
        from app.serve import Servers

        app.config["HTTP_ADDR"] = ("127.0.0.1", 0)
        app.config["AGENT_ADDR"] = ("127.0.0.1", 0)
        app.config.setdefault("RELEASE_SIGNING_KEY", None)
        app.config["RELEASE_SIGNING_KEY"] = app.config["RELEASE_SIGNING_KEY"] or release_key()[0]
        self.app = app
        self.servers = Servers(app, scheduler=scheduler)

    def __enter__(self) -> LiveServer:
        self.servers.start()
        return self

    def __exit__(self, *exc) -> None:
        self.servers.stop()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.servers.admin_port}"

    @property
    def agent_http_url(self) -> str:
        return f"http://127.0.0.1:{self.servers.agent_port}"

    @property
    def agent_ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.servers.agent_port}"


class ServerProcess:
    """``restic-manager serve`` as a separate process (what an operator runs)."""

    def __init__(self, instance_dir: str, database_url: str, version: str, extra_env: dict | None = None):
        self.instance_dir = instance_dir
        os.makedirs(instance_dir, exist_ok=True)
        self.ready_file = os.path.join(instance_dir, "ready")
        self.log_path = os.path.join(instance_dir, "server.log")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RM_")},
            "RM_INSTANCE_PATH": instance_dir,
            "RM_DATABASE_URL": database_url,
            "RM_VERSION": version,
            "RM_HTTP_ADDR": "127.0.0.1:0",
            "RM_AGENT_ADDR": "127.0.0.1:0",
            "RM_SECRET_KEY": "e2e-secret",
            "RM_HEARTBEAT_S": "1",
            "RM_HEARTBEAT_TIMEOUT": "5",
            "RM_LOG_LEVEL": "INFO",
            "RM_RELEASE_SIGNING_KEY": release_key()[0],
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.admin_port = self.agent_port = 0

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if os.path.exists(self.ready_file):
            os.unlink(self.ready_file)
        if self.agent_port:
            # A restart keeps its ports, as a real server would: agents reconnect to the same address.
            self.env["RM_HTTP_ADDR"] = f"127.0.0.1:{self.admin_port}"
            self.env["RM_AGENT_ADDR"] = f"127.0.0.1:{self.agent_port}"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", "serve", "--ready-file", self.ready_file],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}; log:\n{self.log()}")
            try:
                with open(self.ready_file) as f:
                    parts = f.read().split()
                return len(parts) == 2 and parts
            except FileNotFoundError:
                return None

        parts = wait_until(ready, timeout, 0.05, "the server to listen")
        self.admin_port, self.agent_port = int(parts[0]), int(parts[1])
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def agent_ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.agent_port}"


_build_cache: dict[str, str] = {}
_build_lock = threading.Lock()


def built_agent(version: str, cache_dir: str) -> str:
    """Build (once per version per run) the agent zipapp claiming ``version``, signed with the run's
    release key (``<artifact>.sig`` beside it, as a release process leaves it); return its path."""
    from agent.build import build_agent

    with _build_lock:
        path = _build_cache.get(version)
        if path is None or not os.path.exists(path):
            with open(release_key()[0], "rb") as f:
                built = build_agent(version, os.path.join(cache_dir, version), sign_key=f.read())
            path = built.path
            _build_cache[version] = path
        return path


class AgentProcess:
    """A real agent zipapp in its own directory, kept running by a test supervisor."""

    def __init__(
        self,
        workdir: str,
        program_src: str,
        server_ws_url: str,
        token: str,
        extra_config: str = "",
        restart_sec: float = 0.05,
    ):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.program = os.path.join(workdir, "restic-manager-agent.pyz")
        shutil.copyfile(program_src, self.program)
        self.config = os.path.join(workdir, "agent.toml")
        with open(self.config, "w") as f:
            f.write(
                f'server_url = "{server_ws_url}"\ntoken = "{token}"\nbackoff_max_s = 1\n'
                f'release_public_key = "{release_key()[1]}"\n{extra_config}'
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
        from agent.recovery import install_guard

        # As the systemd unit runs it: the guard before every start (ExecStartPre=), then the program.
        guard = install_guard(workdir)
        script = 'sh "$1" "$2" && exec "$3" "$4" --config "$5"'
        self.supervisor = Supervisor(
            ["sh", "-c", script, "agent", guard, workdir, sys.executable, self.program, self.config],
            cwd=workdir,
            env=env,
            log_path=os.path.join(workdir, "agent.log"),
            restart_sec=restart_sec,
        )

    def start(self) -> AgentProcess:
        self.supervisor.start()
        return self

    def stop(self) -> None:
        self.supervisor.stop()

    def log(self) -> str:
        with open(self.supervisor.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def program_bytes(self) -> bytes:
        with open(self.program, "rb") as f:
            return f.read()


def seed_fleet(host_names, password: str = "admin-pass-123"):
    """Create user ``admin`` (with an API token) and enrol ``host_names``; return (ids, agent tokens, API token)."""
    from app.extensions import db
    from app.models import ApiToken, Host, User

    admin = User.create("admin", password, "admin")
    hosts = [Host.enrol(name) for name in host_names]
    _, api_token = ApiToken.issue(admin, "tests")
    db.session.commit()
    return [h.id for h, _ in hosts], [t for _, t in hosts], api_token


class AdminSession:
    """A logged-in admin talking to a live server over HTTP, as a browser or script would."""

    def __init__(self, base_url: str):
        self.base = base_url
        self.http = requests.Session()

    def login(self, username: str, password: str) -> AdminSession:
        import re

        page = self.http.get(self.base + "/login", timeout=10)
        m = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text) or re.search(
            r'name="csrf_token" value="([^"]+)"', page.text
        )
        data = {"username": username, "password": password}
        if m:
            data["csrf_token"] = m.group(1)
        r = self.http.post(self.base + "/login", data=data, timeout=10, allow_redirects=False)
        assert r.status_code in (302, 303), f"login failed: {r.status_code} {r.text[:300]}"
        return self

    def csrf_token(self, path: str = "/") -> str | None:
        import re

        page = self.http.get(self.base + path, timeout=10)
        m = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
        return m.group(1) if m else None

    def get_json(self, path: str):
        r = self.http.get(self.base + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def post_json(self, path: str, body=None):
        return self.http.post(self.base + path, json=body if body is not None else {}, timeout=10)
