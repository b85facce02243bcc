"""Machinery for the several-instance tests and benchmarks: a real HAProxy in front of the agent
planes, and a private PostgreSQL server (Debian's ``initdb``/``pg_ctl``) that a test may restart.

No pytest imports: the benchmarks use it too.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess

from tests.support.wait import wait_until

#: The HAProxy configuration docs/deploy.md shows, with this test's addresses filled in.
HAPROXY_CONFIG = """\
global
    # each proxied agent costs two descriptors: keep 2 x maxconn under the open-files limit
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 2s
    # longer than the agents' heartbeat timeout (RM_HEARTBEAT_TIMEOUT, 45 s by default)
    timeout client 75s
    timeout server 75s
    timeout tunnel 75s
    # a connect refused by a dead instance is tried again on another one
    option redispatch
    retries 3

frontend agents
    bind {bind}
    default_backend restic_manager_agents

backend restic_manager_agents
    balance leastconn
    option httpchk GET /agent/health
    http-check expect status 200
    default-server inter {check_ms}ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""


def free_port() -> int:
    """A port that was free a moment ago (for programs that cannot take port 0, like HAProxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None


class HAProxy:
    """HAProxy in TCP mode in front of the agent planes of several instances, on 127.0.0.1."""

    def __init__(self, workdir: str, backends: list[tuple[str, int]], check_ms: int = 200, maxconn: int = 4000):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        servers = "\n".join(f"    server i{n} {h}:{p} check" for n, (h, p) in enumerate(backends))
        self.config_text = HAPROXY_CONFIG.format(
            bind=f"127.0.0.1:{self.port}", check_ms=check_ms, servers=servers, maxconn=maxconn
        )
        self.config = os.path.join(workdir, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(self.config_text)
        self.log_path = os.path.join(workdir, "haproxy.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        binary = haproxy_binary()
        assert binary, "haproxy is not installed (scripts/test installs Debian's package)"
        check = subprocess.run([binary, "-c", "-f", self.config], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", self.config], stdout=log, stderr=subprocess.STDOUT)

        def listening():
            assert self.proc.poll() is None, f"haproxy exited: {self.log()}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 10, 0.05, "haproxy to listen")
        return self

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def postgres_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own: ``initdb`` in a temp folder, ``pg_ctl`` on a free port.

    It never touches the machine's own server. Run as root, the server runs as the ``postgres``
    user (PostgreSQL refuses root), through ``runuser``.
    """

    def __init__(self):
        import tempfile

        self.bindir = postgres_bindir()
        assert self.bindir, "PostgreSQL's server binaries are not installed (scripts/test installs them)"
        # its own folder outside the test's (pytest's are private to root; the server runs as postgres)
        self.workdir = workdir = tempfile.mkdtemp(prefix="rm-test-pg-")
        self.datadir = os.path.join(workdir, "data")
        self.log_path = os.path.join(workdir, "postgres.log")
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres", "postgres")
            os.chmod(workdir, 0o755)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        out = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{args[0]} failed: {out.stdout}{out.stderr}"

    def init(self) -> PrivatePostgres:
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", "postgres", "--auth=trust", "-N")
        return self

    def start(self, **settings) -> PrivatePostgres:
        """Start (``settings``: more ``-c name=value``, e.g. ``max_connections=400``; kept for restarts)."""
        self.settings = {**getattr(self, "settings", {}), **settings}
        opts = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        opts += "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._run(
            os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-l", self.log_path, "-o", opts, "-w", "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""
