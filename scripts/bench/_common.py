"""Small helpers shared by the benchmarks in scripts/bench: a real server process, /proc readings, stats.

Everything here is stdlib only (plus the suite's ``wait_until``) and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support.wait import wait_until  # noqa: E402  (the suite's one polling helper)


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def per_call_ms(fn, reps: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call of ``fn``, the mean over ``reps`` calls."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - w0) * 1000 / reps, (time.process_time() - c0) * 1000 / reps


def prompt_fleet() -> str:
    """Give the load process (one thread standing in for a fleet of separate machines) a real-time
    round-robin priority, when allowed (root); return the policy it runs under.

    On a 2-core machine it shares the CPUs with 20,000 server threads. Under the ordinary policy
    every send to an agent socket woke a server thread that preempted it: 501 heartbeats took
    5.6 s, the fleet fell a minute behind (the server then saw its agents as silent and dropped
    them) and runs failed. Real agents have CPUs of their own, so the server is not flattered:
    the load process still takes its CPU from the same two cores, only without the wait.
    (The kernel's real-time throttling still leaves the rest 5 % of every second.)"""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
        return "SCHED_RR 1"
    except (AttributeError, OSError):
        return "normal (no permission for SCHED_RR)"


def proc_status(pid: int) -> dict:
    """VmRSS/VmHWM/VmSize (KiB) and Threads of ``pid`` from /proc/<pid>/status ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (``serve --workers N``: the parent and its N workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(c) for c in f.read().split())]
    except FileNotFoundError:
        return [pid]


def group_status(pid: int) -> dict:
    """:func:`proc_status` summed over :func:`process_tree`, plus each process's VmRSS (``rss_each``)."""
    out: dict = {"rss_each": []}
    for p in process_tree(pid):
        st = proc_status(p)
        for key, value in st.items():
            out[key] = out.get(key, 0) + value
        if st:
            out["rss_each"].append(st.get("VmRSS", 0))
    return out


def group_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tcp_ext(*names: str) -> dict[str, int]:
    """Counters from /proc/net/netstat TcpExt (e.g. ListenOverflows, ListenDrops)."""
    with open("/proc/net/netstat") as f:
        lines = [ln.split() for ln in f if ln.startswith("TcpExt:")]
    table = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=False))
    return {n: table.get(n, 0) for n in names}


def sysctl(name: str) -> str:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def percentile(values, p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    vals = sorted(values)
    if not vals:
        return None
    k = max(0, min(len(vals) - 1, int(round(p / 100.0 * len(vals) + 0.5)) - 1))
    return vals[k]


def kill_group(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Signal ``proc``'s process group (it was started with start_new_session), then SIGKILL if needed."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of the group (also after a clean exit of the leader)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def server_env(instance_dir: str, database_url: str, **rm_vars: str) -> dict[str, str]:
    """The ``RM_*`` environment of a throw-away server instance (the caller's RM_* are dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    # An installed server has its modules compiled once (pip does it); with PYTHONDONTWRITEBYTECODE
    # set, as some shells here do, every start (and restart, in a storm) compiles app/ again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        RM_INSTANCE_PATH=instance_dir,
        RM_DATABASE_URL=database_url,
        RM_SECRET_KEY="bench-secret",
        RM_HTTP_ADDR="127.0.0.1:0",
        RM_AGENT_ADDR="127.0.0.1:0",
    )
    env.update({k: str(v) for k, v in rm_vars.items()})
    return env


def cli(env: dict, *args: str, timeout: float = 120.0) -> str:
    """Run ``restic-manager ARGS`` (as the console script would) and return its stdout."""
    res = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"restic-manager {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


class Server:
    """``restic-manager serve --no-build`` in its own process group, like tests/support/live.py's ServerProcess.

    ``build=True`` drops ``--no-build``: the server builds (and, with RM_RELEASE_SIGNING_KEY, signs)
    the agent artifact for its own version before it listens.
    """

    def __init__(self, env: dict, log_path: str, build: bool = False, serve_args: tuple[str, ...] = ()):
        self.env = env
        self.serve_args = tuple(serve_args)  # e.g. ("--workers", "4")
        self.build = build
        self.log_path = log_path
        self.ready_file = log_path + ".ready"
        self.proc: subprocess.Popen | None = None
        self.admin_port = self.agent_port = 0

    def start(self, timeout: float = 60.0, **env_overrides: str) -> Server:
        if os.path.exists(self.ready_file):
            os.unlink(self.ready_file)
        env = {**self.env, **env_overrides}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from app.cli import main; main()", "serve",
                 *(() if self.build else ("--no-build",)), "--ready-file", self.ready_file, *self.serve_args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                with open(self.ready_file) as f:
                    parts = f.read().split()
            except FileNotFoundError:
                return None
            return parts if len(parts) == 2 else None

        parts = wait_until(ready, timeout, 0.02, "the server to listen")
        self.admin_port, self.agent_port = int(parts[0]), int(parts[1])
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stop(self, timeout: float = 15.0) -> int | None:
        return kill_group(self.proc, signal.SIGTERM, timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except FileNotFoundError:
            return ""


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 30))
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        print(f"{k.ljust(width)}  {v}")
