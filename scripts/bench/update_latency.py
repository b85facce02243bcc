#!/usr/bin/env python3
"""How long one agent update takes, next to a plain restart of the same agent.

    .venv/bin/python scripts/bench/update_latency.py --reps 10 [--json] [--probe http|db]
        [--restart-mode exec|exit] [--restart-sec S|unit]

In one run, against a real ``restic-manager serve`` (RM_VERSION=B, 127.0.0.1, ephemeral ports,
fresh migrated SQLite instance) and a real agent zipapp (built from this tree as version A) kept
running by ``tests.support.supervisor.Supervisor`` (what systemd's ``Restart=always`` does):

(a) restart-and-reconnect, ``--reps`` times (alternating with (b)): SIGKILL the agent process
    (the supervisor restarts it after ``--restart-sec``) and time kill -> the server has recorded
    the new connection's hello.
(b) full update, ``--reps`` times: ``POST /api/hosts/<id>/update`` with an admin API token, then
    time dispatch -> the job is ``succeeded``. Before each rep (not timed) the agent is reset to A:
    supervisor stopped, the A build copied back, ``.old``/state removed, supervisor started, online.

Both use the same supervisor and the same ``--restart-sec``, so b/a is what the update adds on top
of a restart: command, download, verify, swap, exit. ``--restart-sec unit`` takes the shipped
systemd unit's ``RestartSec=`` (scripts/systemd/restic-manager-agent.service). ``--restart-mode``
is the agent's ``restart_mode``: ``exec`` (shipped: the agent re-executes the swapped-in file in
place, so no supervisor restart and no RestartSec lie on the update path) or ``exit`` (exit 0 and
let the supervisor start it after RestartSec). scripts/bench/self_restart.py compares the two.

How "the server saw it" is detected (``--probe``; both poll every ``--poll-ms``, default 5 ms):

* ``http`` (default): ``GET /api/hosts/<id>`` resp. ``GET /api/jobs/<id>`` with the API token.
* ``db``: a read-only SQLite connection to the server's database (WAL; the server never waits on
  it), ~50 us per poll instead of a Flask request per poll competing for the 2 CPUs.

Each figure is reported twice: **server** = the server's own timestamp of the event (``hosts.
last_seen`` written by the hello, ``jobs.finished_at`` written when the hello at B claims the job;
microsecond resolution, same machine clock as the bench's ``time.time()`` at the kill/dispatch),
independent of polling; **observed** = when the bench's poll first saw it (adds up to one poll
interval plus one request). The phase breakdown comes from the agent's and the server's logs
(millisecond timestamps) and the supervisor's exit/start instants.

Everything talks to 127.0.0.1; every wait has a deadline; the server, the agent and the
supervisor are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _common import cli, percentile, server_env, wait_until  # noqa: E402

A, B = "1.0.0", "2.0.0"
TARGET_RATIO = 1.5
TARGET_B_S = 1.0
STEP_TIMEOUT_S = 30.0
UNIT = os.path.join(ROOT, "scripts", "systemd", "restic-manager-agent.service")


def unit_restart_sec(path: str = UNIT) -> float:
    """The ``RestartSec=`` of the shipped unit, in seconds (plain seconds or ``ms``/``s`` suffixes)."""
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*RestartSec\s*=\s*([0-9.]+)\s*(ms|s)?\s*$", line)
            if m:
                return float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    return 0.1  # systemd's default


def restart_sec_arg(value: str) -> float:
    return unit_restart_sec() if value == "unit" else float(value)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ setup


def make_instance(tmp: str) -> tuple[str, str, str, int, str]:
    """Migrate a fresh SQLite instance; add an admin, an API token and one host."""
    instance = os.path.join(tmp, "server")
    os.makedirs(instance)
    db_path = os.path.join(instance, "bench.sqlite3")
    url = "sqlite:///" + db_path
    env = server_env(instance, url, RM_VERSION=B)
    cli(env, "db", "upgrade")

    from app import create_app
    from app.extensions import db
    from app.models import ApiToken, Host, User

    app = create_app(environ=env)
    with app.app_context():
        user = User.create("bench-admin", os.urandom(16).hex(), "admin")
        _, api_token = ApiToken.issue(user, "update-latency bench")
        host, agent_token = Host.enrol("bench-update-1")
        db.session.commit()
        host_id = host.id
        db.engine.dispose()
    return instance, url, db_path, host_id, f"{api_token}\n{agent_token}"


def parse_ts(value: str | None) -> float | None:
    """A server timestamp (naive UTC; ISO with optional Z, or SQLite's text) as epoch seconds."""
    if not value:
        return None
    value = value.rstrip("Z").replace(" ", "T")
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()


class HttpProbe:
    name = "http"

    def __init__(self, base: str, api_token: str):
        import requests

        self.base = base
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {api_token}"

    def host(self, host_id: int) -> tuple[bool, float | None, str | None]:
        r = self.http.get(f"{self.base}/api/hosts/{host_id}", timeout=5)
        r.raise_for_status()
        h = r.json()["host"]
        return h["online"], parse_ts(h["last_seen"]), h["agent_version"]

    def job(self, job_id: str) -> tuple[str, float | None, str | None]:
        r = self.http.get(f"{self.base}/api/jobs/{job_id}", timeout=5)
        r.raise_for_status()
        j = r.json()["job"]
        return j["status"], parse_ts(j["finished_at"]), j["error"]

    def close(self) -> None:
        self.http.close()


class DbProbe:
    name = "db"

    def __init__(self, db_path: str):
        self.con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5, isolation_level=None)

    def host(self, host_id: int):
        row = self.con.execute(
            "SELECT connected, last_seen, agent_version FROM hosts WHERE id = ?", (host_id,)
        ).fetchone()
        return bool(row[0]), parse_ts(row[1]), row[2]

    def job(self, job_id: str):
        row = self.con.execute("SELECT status, finished_at, error FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0], parse_ts(row[1]), row[2]

    def close(self) -> None:
        self.con.close()


def poll(fn, interval: float, timeout: float, what: str):
    """Wait (the suite's ``wait_until``) until ``fn`` is truthy; return (value, time.time())."""
    return wait_until(fn, timeout, interval, what), time.time()


class ExitWatcher:
    """Record the wall-clock instant of the supervised child's next exit (woken by the supervisor)."""

    def __init__(self, supervisor):
        self.sup = supervisor
        self.n = len(supervisor.exit_codes)
        self.at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        if self.sup.wait_for(lambda: len(self.sup.exit_codes) > self.n, STEP_TIMEOUT_S):
            self.at = time.time()

    def result(self) -> float | None:
        self.thread.join(STEP_TIMEOUT_S)
        return self.at


# ============================================================================ log parsing

_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _line_ts(line: str) -> float | None:
    m = _LOG_TS.match(line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000.0


def read_from(path: str, offset: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def first(text: str, pattern: str) -> float | None:
    rx = re.compile(pattern)
    for line in text.splitlines():
        if rx.search(line):
            return _line_ts(line)
    return None


# ============================================================================ the bench


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="rm-bench-update-")
        self.server = None
        self.agent = None
        self.probe = None
        self.interval = args.poll_ms / 1000.0
        self.mono_to_wall = time.time() - time.monotonic()

    # ---------------------------------------------------------------- lifecycle

    def setup(self):
        from tests.support.live import ServerProcess, built_agent

        t0 = time.monotonic()
        instance, url, self.db_path, self.host_id, tokens = make_instance(self.tmp)
        self.instance, self.db_url = instance, url
        self.api_token, self.agent_token = tokens.split("\n")
        builds = os.path.join(self.tmp, "builds")
        self.a_build = built_agent(A, builds)
        log(f"[bench] instance migrated, agent {A} built ({time.monotonic() - t0:.1f} s) in {self.tmp}")
        # heartbeats every 30 s: no heartbeat or last_seen "touch" lands inside a measurement
        extra = {"RM_HEARTBEAT_S": "30", "RM_HEARTBEAT_TIMEOUT": "90", "RM_LOG_LEVEL": "INFO"}
        self.server = ServerProcess(instance, url, B, extra_env=extra).start()
        log(f"[bench] server {B} up: admin {self.server.admin_url} agents {self.server.agent_ws_url}")
        if self.args.probe == "db":
            self.probe = DbProbe(self.db_path)
        else:
            self.probe = HttpProbe(self.server.admin_url, self.api_token)
        self.agent_dir = os.path.join(self.tmp, "agent")

    def start_agent(self):
        """(Re)install the A build in the agent directory and start it under a fresh supervisor."""
        from tests.support.live import AgentProcess

        if self.agent is not None:
            self.agent.stop()
        for suffix in (".old", ".new", ".old.tmp"):
            p = os.path.join(self.agent_dir, "restic-manager-agent.pyz" + suffix)
            if os.path.exists(p):
                os.remove(p)
        state = os.path.join(self.agent_dir, "update-state.json")
        if os.path.exists(state):
            os.remove(state)
        since = time.time()
        extra = f'restart_mode = "{self.args.restart_mode}"\n'
        self.agent = AgentProcess(
            self.agent_dir,
            self.a_build,
            self.server.agent_ws_url,
            self.agent_token,
            extra_config=extra,
            python=getattr(self.args, "agent_python", None) or sys.executable,
        )
        self.agent.supervisor.restart_sec = self.args.restart_sec
        self.agent.start()

        def online_at_a():
            online, seen, version = self.probe.host(self.host_id)
            return online and version == A and seen is not None and seen >= since

        poll(online_at_a, 0.02, STEP_TIMEOUT_S, f"the agent online at {A}")
        time.sleep(self.args.settle)

    def teardown(self):
        for what, fn in (
            ("probe", lambda: self.probe and self.probe.close()),
            ("agent", lambda: self.agent and self.agent.stop()),
            ("server", lambda: self.server and self.server.stop()),
        ):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                log(f"[bench] stopping the {what}: {exc!r}")
        if self.args.keep:
            log(f"[bench] kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- (a)

    def restart_rep(self) -> dict:
        sup = self.agent.supervisor
        pid = sup.pid
        if pid is None:
            raise RuntimeError("the agent is not running")
        starts = sup.starts
        agent_off = os.path.getsize(sup.log_path)
        watcher = ExitWatcher(sup)
        t0 = time.time()
        os.kill(pid, signal.SIGKILL)

        def hello_seen():
            online, seen, _ = self.probe.host(self.host_id)
            return seen if online and seen is not None and seen > t0 else None

        hello_at, observed_at = poll(hello_seen, self.interval, STEP_TIMEOUT_S, "the new hello")
        exited = watcher.result()
        if sup.starts <= starts:
            raise RuntimeError("the supervisor did not restart the agent")
        restarted = sup.start_times[starts] + self.mono_to_wall
        text = read_from(sup.log_path, agent_off)
        started = first(text, r"INFO agent: restic-manager agent .* starting")
        rep = {
            "server_s": hello_at - t0,
            "observed_s": observed_at - t0,
            "phases": {
                "kill -> exit seen by supervisor": _d(t0, exited),
                "exit -> supervisor restart": _d(exited, restarted),
                "restart -> agent main() running": _d(restarted, started),
                "agent running -> hello recorded": _d(started, hello_at),
                "hello recorded -> observed": _d(hello_at, observed_at),
            },
        }
        time.sleep(self.args.settle)
        return rep

    # ---------------------------------------------------------------- (b)

    def update_rep(self) -> dict:
        self.start_agent()  # reset to A: not timed
        sup = self.agent.supervisor
        starts = sup.starts
        agent_off = os.path.getsize(sup.log_path)
        server_off = os.path.getsize(self.server.log_path)
        pid = sup.pid
        exec_mode = self.args.restart_mode == "exec"
        watcher = None if exec_mode else ExitWatcher(sup)
        http = self.probe.http if isinstance(self.probe, HttpProbe) else None
        if http is None:
            import requests

            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {self.api_token}"
        t0 = time.time()
        r = http.post(f"{self.server.admin_url}/api/hosts/{self.host_id}/update", json={}, timeout=10)
        t_post = time.time()
        if r.status_code != 202:
            raise RuntimeError(f"dispatch refused: {r.status_code} {r.text[:300]}")
        job_id = r.json()["job"]["id"]

        def ended():
            status, finished, error = self.probe.job(job_id)
            return (status, finished, error) if status != "running" else None

        (status, finished_at, error), observed_at = poll(ended, self.interval, STEP_TIMEOUT_S, "the job to end")
        if status != "succeeded":
            raise RuntimeError(f"update job {job_id} {status}: {error}\n{self.agent.log()}")
        _, hello_at, _ = self.probe.host(self.host_id)
        atext = read_from(sup.log_path, agent_off)
        stext = read_from(self.server.log_path, server_off)
        if exec_mode:
            # the same process went on: no exit, no supervisor restart, no RestartSec
            if sup.starts != starts or sup.pid != pid:
                raise RuntimeError(f"restart_mode exec, but the supervisor restarted the agent:\n{atext}")
            exited = restarted = first(atext, r"INFO agent.reexec: restarting in place")
        else:
            exited = watcher.result()
            restarted = sup.start_times[starts] + self.mono_to_wall if sup.starts > starts else None
        received = first(atext, r"INFO agent: update job .*: updating ")
        downloading = first(stext, rf"update job {job_id}: phase downloading \(0/")
        verifying = first(stext, rf"update job {job_id}: phase verifying")
        staging = first(stext, rf"update job {job_id}: phase staging")
        restarting = first(stext, rf"update job {job_id}: phase restarting")
        started = first(atext, rf"INFO agent: restic-manager agent {re.escape(B)} starting")
        handover = (
            {
                "restarting reported -> execv": _d(restarting, exited),
                "execv -> agent main() running": _d(exited, started),
            }
            if exec_mode
            else {
                "restarting reported -> process exit": _d(restarting, exited),
                "exit -> supervisor restart": _d(exited, restarted),
                "restart -> agent main() running": _d(restarted, started),
            }
        )
        rep = {
            "server_s": finished_at - t0,
            "observed_s": observed_at - t0,
            "post_s": t_post - t0,
            "phases": {
                "dispatch -> command received by agent": _d(t0, received),
                "command -> download started (reported)": _d(received, downloading),
                "download (incl. fsync)": _d(downloading, verifying),
                "verify (sha256)": _d(verifying, staging),
                "swap (.old copy, rename, fsyncs, state)": _d(staging, restarting),
                **handover,
                "agent running -> hello recorded": _d(started, hello_at),
                "hello recorded -> job succeeded": _d(hello_at, finished_at),
                "job succeeded -> observed": _d(finished_at, observed_at),
            },
        }
        if http is not getattr(self.probe, "http", None):
            http.close()
        return rep


def _d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {}
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "p90": percentile(vals, 90),
        "min": min(vals),
        "max": max(vals),
    }


def phase_medians(reps: list[dict]) -> dict:
    names = list(reps[0]["phases"]) if reps else []
    return {n: stats([r["phases"][n] for r in reps]).get("median") for n in names}


def machine() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def report(result: dict) -> None:
    def ms(v):
        return "     -" if v is None else f"{v * 1000:6.0f}"

    print(
        f"\nUpdate latency ({result['reps']} reps each; probe={result['probe']}, poll {result['poll_ms']} ms, "
        f"supervisor restart_sec={result['restart_sec']} s, restart_mode={result['restart_mode']}, kill=SIGKILL)"
    )
    m = result["machine"]
    print(
        f"machine: {m['cpus']} CPUs, {m['cpu']}, Python {m['python']}, "
        f"load avg (1 min) {m['loadavg_1m_start']} at start, {m['loadavg_1m_end']} at end"
    )
    print(f"\n{'ms':44s} {'median':>6s} {'p90':>6s} {'min':>6s} {'max':>6s}")
    for key, label in (
        ("a_server", "(a) kill -> hello recorded      [server ts]"),
        ("a_observed", "(a) kill -> hello seen by poll  [observed]"),
        ("b_server", "(b) dispatch -> job succeeded   [server ts]"),
        ("b_observed", "(b) dispatch -> job seen succeeded [obs.]"),
    ):
        s = result[key]
        print(f"{label:44s} {ms(s.get('median'))} {ms(s.get('p90'))} {ms(s.get('min'))} {ms(s.get('max'))}")
    for kind in ("server", "observed"):
        ratio = result[f"ratio_{kind}"]
        print(f"ratio b/a [{kind}]: {ratio:.2f}")
    ok = result["target_met"]
    print(f"target (ratio <= {TARGET_RATIO}, median(b) <= {TARGET_B_S} s, both measures): {'MET' if ok else 'NOT MET'}")
    for title, key in (("(a) restart breakdown, medians", "a_phases"), ("(b) update breakdown, medians", "b_phases")):
        print(f"\n{title} (ms):")
        for name, v in result[key].items():
            print(f"  {name:44s} {ms(v)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="repetitions of (a) and of (b) (default 10)")
    p.add_argument("--probe", choices=("http", "db"), default="http", help="how the bench sees server state")
    p.add_argument("--poll-ms", type=float, default=5.0, help="poll interval in ms (default 5)")
    p.add_argument(
        "--restart-sec",
        type=restart_sec_arg,
        default=0.05,
        help="supervisor RestartSec for (a) and (b); 'unit' = the shipped unit's (default 0.05)",
    )
    p.add_argument(
        "--restart-mode",
        choices=("exec", "exit"),
        default="exec",
        help="the agent's restart_mode: re-exec in place (shipped) or exit for the supervisor",
    )
    p.add_argument("--settle", type=float, default=0.3, help="idle seconds after the agent is online")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs, database)")
    args = p.parse_args(argv)
    if args.reps < 1 or not 0 < args.poll_ms <= 1000:
        p.error("--reps must be >= 1 and --poll-ms in (0, 1000]")

    load_start = round(os.getloadavg()[0], 2)
    bench = Bench(args)
    a_reps, b_reps = [], []
    try:
        bench.setup()
        bench.start_agent()
        # (a) and (b) alternate, so a change in background load hits both series alike
        for i in range(args.reps):
            for series, fn, tag in ((a_reps, bench.restart_rep, "a"), (b_reps, bench.update_rep, "b")):
                rep = fn()
                series.append(rep)
                log(
                    f"[bench] ({tag}) rep {i + 1}: server {rep['server_s'] * 1000:.0f} ms, "
                    f"observed {rep['observed_s'] * 1000:.0f} ms"
                )
    except Exception:
        logs = (("agent", bench.agent and bench.agent.log()), ("server", bench.server and bench.server.log()))
        for name, text in logs:
            if text:
                log(f"[bench] {name} log tail:\n{text[-3000:]}")
        raise
    finally:
        bench.teardown()

    result = {
        "reps": args.reps,
        "probe": args.probe,
        "poll_ms": args.poll_ms,
        "restart_sec": args.restart_sec,
        "restart_mode": args.restart_mode,
        "kill_signal": "SIGKILL",
        "machine": {**machine(), "loadavg_1m_start": load_start},
        "a_server": stats([r["server_s"] for r in a_reps]),
        "a_observed": stats([r["observed_s"] for r in a_reps]),
        "b_server": stats([r["server_s"] for r in b_reps]),
        "b_observed": stats([r["observed_s"] for r in b_reps]),
        "a_phases": phase_medians(a_reps),
        "b_phases": phase_medians(b_reps),
        "a_reps": a_reps,
        "b_reps": b_reps,
    }
    result["ratio_server"] = result["b_server"]["median"] / result["a_server"]["median"]
    result["ratio_observed"] = result["b_observed"]["median"] / result["a_observed"]["median"]
    result["target_met"] = all(
        result[f"ratio_{k}"] <= TARGET_RATIO and result[f"b_{k}"]["median"] <= TARGET_B_S
        for k in ("server", "observed")
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
