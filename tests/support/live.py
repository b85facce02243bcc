"""Real servers and real agents on 127.0.0.1 ephemeral ports, for integration and end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import requests

from tests.support.supervisor import Supervisor
from tests.support.wait import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def product_env(overrides: dict[str, str]) -> dict[str, str]:
    """The environment of a product process a test starts (the console script, a ``ServerProcess``): this
    process's without its ``RM_*``, plus ``overrides``.

    It may cache bytecode (``PYTHONDONTWRITEBYTECODE`` is dropped; ``__pycache__`` is git-ignored
    and agent/build.py leaves it out): otherwise each of the hundreds of processes the suite
    starts compiles every project module it imports from source again, ~0.16 s of CPU for the
    ~60 that a ``restic-manager fleet status`` imports (docs/benchmarks.md).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_") and k != "PYTHONDONTWRITEBYTECODE"}
    return env | overrides


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
        scheme = "https" if self.servers.agent_tls else "http"
        return f"{scheme}://127.0.0.1:{self.servers.agent_port}"

    @property
    def agent_ws_url(self) -> str:
        scheme = "wss" if self.servers.agent_tls else "ws"
        return f"{scheme}://127.0.0.1:{self.servers.agent_port}"


class ServerProcess:
    """``restic-manager serve`` as a separate process (what an operator runs)."""

    def __init__(
        self,
        instance_dir: str,
        database_url: str,
        version: str,
        extra_env: dict | None = None,
        serve_args: tuple[str, ...] = (),
    ):
        self.instance_dir = instance_dir
        self.serve_args = list(serve_args)  # e.g. ("--workers", "2")
        os.makedirs(instance_dir, exist_ok=True)
        self.ready_file = os.path.join(instance_dir, "ready")
        self.log_path = os.path.join(instance_dir, "server.log")
        self.env = product_env(
            {
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
        )
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
            [sys.executable, "-c", "from app.cli import main; main()", "serve", "--ready-file", self.ready_file]
            + self.serve_args,
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
        scheme = "wss" if self.env.get("RM_AGENT_TLS_CERT") else "ws"
        return f"{scheme}://127.0.0.1:{self.agent_port}"


_build_cache: dict = {}
_build_lock = threading.Lock()


def agent_build(version: str, cache_dir: str):
    """Build (once per version per run) the agent zipapp claiming ``version``, signed with the run's
    release key (``<artifact>.sig`` beside it, as a release process leaves it); return its BuildResult.

    Every test that needs a real agent program shares these builds (building one takes a while).
    """
    from agent.build import build_agent

    with _build_lock:
        built = _build_cache.get(version)
        if built is None or not os.path.exists(built.path):
            built = build_agent(version, os.path.join(cache_dir, version), sign_key=release_key_pem())
            _build_cache[version] = built
        return built


def built_agent(version: str, cache_dir: str) -> str:
    """The path of :func:`agent_build`'s zipapp for ``version``."""
    return agent_build(version, cache_dir).path


def release_key_pem() -> bytes:
    with open(release_key()[0], "rb") as f:
        return f.read()


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
        python: str = sys.executable,
    ):
        """``python`` runs the zipapp (a bench may pass the host's ``/usr/bin/python3``, as the unit does)."""
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
            ["sh", "-c", script, "agent", guard, workdir, python, self.program, self.config],
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


class ZipappHost:
    """One host directory running a real agent zipapp the way the systemd unit does.

    The supervised command is ``sh guard DIR && exec python3 -I program --config FILE``: the
    sh guard runs before every start (ExecStartPre=), then the program replaces the shell.
    """

    def __init__(self, root, program_src: str, server_url: str, public_key: str | None, **config):
        import shutil

        from agent.recovery import install_guard

        self.home = root / "home"
        self.home.mkdir()
        self.program = self.home / "restic-manager-agent.pyz"
        shutil.copyfile(program_src, self.program)
        self.guard = install_guard(str(self.home))
        self.config = self.home / "agent.toml"
        lines = [f'server_url = "{server_url}"', 'token = "tok"', 'log_level = "DEBUG"', "backoff_max_s = 0.5"]
        if public_key:
            lines.append(f'release_public_key = "{public_key}"')
        for key, value in config.items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
        self.config.write_text("\n".join(lines) + "\n")
        self.supervisor = None

    def start(self, **env_overrides):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RM_"))}
        env.update(env_overrides)
        script = 'sh "$1" "$2" && exec "$3" -I "$4" --config "$5"'
        args = [self.guard, str(self.home), sys.executable, str(self.program), str(self.config)]
        cmd = ["sh", "-c", script, "agent", *args]
        self.supervisor = Supervisor(cmd, cwd=str(self.home), env=env).start()
        return self

    def stop(self):
        if self.supervisor is not None:
            self.supervisor.stop()

    def log(self) -> str:
        return self.supervisor.log_text() if self.supervisor else ""

    def installed_version(self) -> str:
        out = subprocess.run(
            [sys.executable, "-I", str(self.program), "--version"], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def state(self) -> dict | None:
        from agent.statefile import read_state

        return read_state(str(self.home))

    def wait_committed(self) -> None:
        """Wait for the probation's commit: it writes the state, then removes the marker (two steps)."""
        wait_until(
            lambda: (self.state() or {}).get("outcome") == "committed" and not (self.home / "probation.json").exists(),
            what=lambda: f"a commit and the marker gone; log:\n{self.log()}",
        )

    def leftovers(self) -> list[str]:
        names = ("restic-manager-agent.pyz.new", "restic-manager-agent.pyz.old.tmp", "probation.json.tmp")
        return [n for n in names if (self.home / n).exists()]


def seed_fleet(host_names, password: str = "admin-pass-123"):
    """Create user ``admin`` (with an API token) and enrol ``host_names``; return (ids, agent tokens, API token)."""
    from app.extensions import db
    from app.models import ApiToken, Host, User

    admin = User.create("admin", password, "admin")
    hosts = [Host.enrol(name) for name in host_names]
    _, api_token = ApiToken.issue(admin, "tests")
    db.session.commit()
    return [h.id for h, _ in hosts], [t for _, t in hosts], api_token


class LiveClient:
    """The one HTTP client of the end-to-end tests: a live server's admin plane over ``requests``,
    as a browser (``login``: cookie session + CSRF) or a script (``token``: an API bearer token)."""

    def __init__(self, base_url: str, token: str | None = None):
        self.base = base_url
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def login(self, username: str = "admin", password: str = "admin-pass-123") -> LiveClient:
        import re

        page = self.http.get(self.base + "/login", timeout=10)
        m = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text) or re.search(
            r'name="csrf_token" value="([^"]+)"', page.text
        )
        data = {"username": username, "password": password}
        if m:
            data["csrf_token"] = m.group(1)
        r = self.http.post(self.base + "/login", data=data, timeout=10, allow_redirects=False)
        if r.status_code not in (302, 303):
            # The page's own error (unknown user or wrong password, locked out, disabled) says why.
            why = re.search(r'<p class="flash flash-error" role="alert">([^<]*)</p>', r.text)
            detail = why.group(1) if why else r.text[:300]
            raise AssertionError(f"login as {username!r} failed: {r.status_code} {detail}")
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

    # Reads the end-to-end tests share.
    def host(self, host_id: int) -> dict:
        return self.get_json(f"/api/hosts/{host_id}")["host"]

    def jobs(self, host_id: int) -> list[dict]:
        return self.get_json(f"/api/hosts/{host_id}/jobs")["jobs"]

    def fleet_update(self, fid: int) -> dict:
        return self.get_json(f"/api/fleet-updates/{fid}")["fleet_update"]

    def fleet_update_ended(self, fid: int) -> dict | None:
        """The rollout once it is no longer running (None while it runs): a ``wait_until`` predicate."""
        fu = self.fleet_update(fid)
        return fu if fu["status"] != "running" else None

    def audit_actions(self, limit: int = 500) -> list[str]:
        return [e["action"] for e in self.get_json(f"/api/audit?limit={limit}")["events"]]

    def open_alerts(self) -> list[dict]:
        return self.get_json("/api/alerts?status=open")["alerts"]

    def all_online(self, host_ids) -> bool:
        return all(self.host(i)["online"] for i in host_ids)


class LiveFleet:
    """A ``restic-manager serve`` process plus real agents on one test's database: the one
    server-plus-agents harness of the end-to-end and fault tests (fixture ``live_fleet``).

    ``seed`` creates the admin (with an API token) and enrols hosts in the test database;
    ``start_server`` / ``start_agent`` start processes that ``stop`` (run at teardown) ends.
    """

    def __init__(self, root: str, database_url: str, builds_dir: str, version: str = "2.0.0"):
        self.root = root
        self.database_url = database_url
        self.builds_dir = builds_dir
        self.version = version
        self.host_ids: list[int] = []
        self.tokens: list[str] = []
        self.api_token: str | None = None
        self.server: ServerProcess | None = None
        self.agents: list[AgentProcess] = []
        self._stoppables: list = []

    def seed(self, host_names, password: str = "admin-pass-123") -> LiveFleet:
        self.host_ids, self.tokens, self.api_token = seed_fleet(host_names, password)
        return self

    def start_server(self, **env: str) -> ServerProcess:
        assert self.server is None, "one server per fleet (restart it with server.stop()/start())"
        self.server = ServerProcess(os.path.join(self.root, "server"), self.database_url, self.version, env)
        self._stoppables.append(self.server)
        return self.server.start()

    def program(self, version: str = "1.0.0") -> str:
        return built_agent(version, self.builds_dir)

    def start_agent(
        self, token: str, version: str = "1.0.0", url: str | None = None, extra_config: str = "", **kwargs
    ) -> AgentProcess:
        """Start a real agent at ``version`` for ``token``, on the server's agent plane (or ``url``)."""
        workdir = os.path.join(self.root, f"agent{len(self.agents)}")
        url = url or self.server.agent_ws_url
        agent = AgentProcess(workdir, self.program(version), url, token, extra_config, **kwargs)
        self.agents.append(agent)
        self._stoppables.append(agent)
        return agent.start()

    def start_agents(self, **kwargs) -> list[AgentProcess]:
        """One agent per seeded host."""
        return [self.start_agent(token, **kwargs) for token in self.tokens]

    def add(self, stoppable):
        """Stop ``stoppable`` (e.g. a FaultProxy) at teardown too, before the server."""
        self._stoppables.append(stoppable)
        return stoppable

    def api(self) -> LiveClient:
        """A client authenticated with the seeded admin's API token."""
        return LiveClient(self.server.admin_url, self.api_token)

    def admin(self, username: str = "admin", password: str = "admin-pass-123") -> LiveClient:
        """A client logged in as a browser would be (cookie session, CSRF)."""
        return LiveClient(self.server.admin_url).login(username, password)

    def stop(self) -> None:
        # agents and proxies first, the server last
        for item in sorted(reversed(self._stoppables), key=lambda x: isinstance(x, ServerProcess)):
            item.stop()
