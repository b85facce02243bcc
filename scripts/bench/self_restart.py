#!/usr/bin/env python3
"""How fast a real host's agent update is with each way of starting the swapped-in program.

    .venv/bin/python scripts/bench/self_restart.py [--reps 5] [--crash-loop-reps 2] [--short-restart-sec 0.1] [--json]

On a machine shared with other work, ``chrt -f 10`` in front (root) runs the bench and everything
it starts at real-time priority: the stand-in for a quiet host (docs/benchmarks.md, run 2).

One real ``restic-manager serve`` (RM_VERSION=B) and one real agent zipapp (built from this tree as
A), run the way ``scripts/bench/update_latency.py`` runs them (its ``Bench``): the agent under
``tests.support.supervisor.Supervisor`` with the sh guard before every start (what systemd's
``Restart=always`` + ``ExecStartPre=`` do). No systemd is running on the bench machine (PID 1 is
not systemd, ``systemctl --user`` has no bus), so the supervisor stands in for it and honours
``RestartSec`` exactly: it waits that long between an exit and the next start.

Each rep times ``POST /api/hosts/<id>/update`` -> the job is ``succeeded`` (written when the hello
at B arrives from the new program), on the server's own timestamp, for three configurations,
interleaved rep by rep so background load hits all of them alike:

* **exec** (shipped): ``restart_mode = "exec"``, supervisor RestartSec = the shipped unit's (2 s).
  The agent re-executes the new file in place, so RestartSec is not on the update path at all.
* **exit-short** (way (b)): ``restart_mode = "exit"``, RestartSec = ``--short-restart-sec``.
* **exit-unit** (before this change): ``restart_mode = "exit"``, RestartSec = the unit's 2 s.

With ``--crash-loop-reps N`` it also times the crash-loop guard under each configuration: the
server offers a correctly signed B that exits 3 at once (it runs no agent code, as a program that
cannot start at all), and the clock runs from the dispatch until the job is ``failed`` — written
when the restored A says hello with ``last_update`` ``rolled_back`` ("crash-looped: 3 starts …").
The starts of the broken program are counted from the supervisor (exec'd start + restarts).

The 1-minute load average (``os.getloadavg()``, what ``uptime`` prints) is recorded at every rep
and printed next to each figure; ``uptime`` is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import wait_until  # noqa: E402
from update_latency import B, Bench, log, phase_medians, stats, unit_restart_sec  # noqa: E402

TARGET_S = 0.5


def host_python() -> str:
    """The unit's interpreter, /usr/bin/python3, when it can run the agent (3.11+); else this one.

    A dev venv's interpreter starts slower (its site imports the editable-install finder), which a
    real host does not pay.
    """
    system = "/usr/bin/python3"
    try:
        out = subprocess.run(
            [system, "-c", "import sys; print(sys.version_info >= (3, 11))"], capture_output=True, text=True, timeout=10
        )
        if out.stdout.strip() == "True":
            return system
    except (OSError, subprocess.SubprocessError):
        pass
    return sys.executable


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


BROKEN = b"#!/usr/bin/env python3\nimport sys\nsys.exit(3)\n"


def release_path(bench) -> str:
    return os.path.join(bench.instance, "releases", f"restic-manager-agent-{B}.pyz")


def serve_release(bench, body: bytes) -> None:
    """Make the bench server offer ``body`` as release B, signed with the run's release key."""
    from _common import server_env

    from app import create_app
    from app.extensions import db
    from app.updates import releases
    from tests.support.live import release_key

    path = release_path(bench)
    with open(path, "wb") as f:
        f.write(body)
    app = create_app(environ=server_env(bench.instance, bench.db_url, RM_VERSION=B))
    with app.app_context():
        with open(release_key()[0], "rb") as f:
            releases.sign_file(path, B, "py3-any", f.read())
        releases.register(path, B)
        db.engine.dispose()


def crash_loop_rep(bench, http) -> dict:
    """Dispatch B = a program that exits 3; time until the job failed with the crash-loop reason."""
    bench.start_agent()  # A, not timed
    sup = bench.agent.supervisor
    starts, exits = sup.starts, len(sup.exit_codes)
    t0 = time.time()
    r = http.post(f"{bench.server.admin_url}/api/hosts/{bench.host_id}/update", json={}, timeout=10)
    if r.status_code != 202:
        raise RuntimeError(f"dispatch refused: {r.status_code} {r.text[:300]}")
    job_id = r.json()["job"]["id"]

    def ended():
        status, finished, error = bench.probe.job(job_id)
        return (status, finished, error) if status != "running" else None

    status, finished_at, error = wait_until(ended, 60, bench.interval, "the crash-looped job to end")
    if status != "failed" or "crash-looped" not in (error or ""):
        raise RuntimeError(f"crash-loop job {job_id} {status}: {error}\n{bench.agent.log()}")
    broken_exits = sup.exit_codes[exits:].count(3)
    return {"server_s": finished_at - t0, "broken_starts": broken_exits, "restarts": sup.starts - starts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="updates per configuration (default 5)")
    p.add_argument("--short-restart-sec", type=float, default=0.1, help="RestartSec of way (b) (default 0.1)")
    p.add_argument("--skip-unit-exit", action="store_true", help="do not run the 2 s exit baseline")
    p.add_argument("--crash-loop-reps", type=int, default=0, help="crash-loop rollbacks per configuration")
    p.add_argument(
        "--agent-python",
        default=host_python(),
        help="interpreter that runs the agent zipapp (default: /usr/bin/python3 when it is 3.11+, as the "
        "unit's ExecStart; else this interpreter)",
    )
    p.add_argument("--poll-ms", type=float, default=5.0)
    p.add_argument("--settle", type=float, default=0.3)
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs, database)")
    args = p.parse_args(argv)

    unit_sec = unit_restart_sec()
    configs = [
        ("exec", "exec", unit_sec, f"exec in place (shipped), unit RestartSec={unit_sec:g} s"),
        ("exit-short", "exit", args.short_restart_sec, f"exit 0 + RestartSec={args.short_restart_sec:g} s (way b)"),
    ]
    if not args.skip_unit_exit:
        configs.append(("exit-unit", "exit", unit_sec, f"exit 0 + unit RestartSec={unit_sec:g} s (before)"))

    up_start = uptime()
    log(f"[bench] {up_start}")
    bench_args = argparse.Namespace(
        probe="db",
        poll_ms=args.poll_ms,
        settle=args.settle,
        keep=args.keep,
        restart_mode="exec",
        restart_sec=unit_sec,
        agent_python=args.agent_python,
    )
    bench = Bench(bench_args)
    reps: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    crash: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    try:
        bench.setup()
        for i in range(args.reps):
            for name, mode, sec, _ in configs:
                bench_args.restart_mode, bench_args.restart_sec = mode, sec
                load = os.getloadavg()[0]
                rep = bench.update_rep()
                rep["load_1m"] = round((load + os.getloadavg()[0]) / 2, 2)
                reps[name].append(rep)
                log(f"[bench] {name} rep {i + 1}: {rep['server_s'] * 1000:.0f} ms (load {rep['load_1m']})")
        if args.crash_loop_reps:
            import requests

            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {bench.api_token}"
            with open(release_path(bench), "rb") as f:
                good = f.read()
            serve_release(bench, BROKEN)
            try:
                for i in range(args.crash_loop_reps):
                    for name, mode, sec, _ in configs:
                        bench_args.restart_mode, bench_args.restart_sec = mode, sec
                        load = os.getloadavg()[0]
                        rep = crash_loop_rep(bench, http)
                        rep["load_1m"] = round((load + os.getloadavg()[0]) / 2, 2)
                        crash[name].append(rep)
                        log(
                            f"[bench] {name} crash-loop rep {i + 1}: {rep['server_s'] * 1000:.0f} ms, "
                            f"{rep['broken_starts']} starts of the broken program (load {rep['load_1m']})"
                        )
            finally:
                serve_release(bench, good)
                http.close()
    except Exception:
        for label, text in (
            ("agent", bench.agent and bench.agent.log()),
            ("server", bench.server and bench.server.log()),
        ):
            if text:
                log(f"[bench] {label} log tail:\n{text[-3000:]}")
        raise
    finally:
        bench.teardown()
    up_end = uptime()

    result = {
        "reps": args.reps,
        "agent_python": args.agent_python,
        "unit_restart_sec": unit_sec,
        "uptime_start": up_start,
        "uptime_end": up_end,
    }
    for name, mode, sec, label in configs:
        loads = [r["load_1m"] for r in reps[name]]
        result[name] = {
            "label": label,
            "restart_mode": mode,
            "restart_sec": sec,
            "server_s": stats([r["server_s"] for r in reps[name]]),
            "load_1m": {"min": min(loads), "max": max(loads), "mean": round(sum(loads) / len(loads), 2)},
            "phases": phase_medians(reps[name]),
            "reps": reps[name],
        }
        if crash[name]:
            cl = [r["load_1m"] for r in crash[name]]
            result[name]["crash_loop"] = {
                "server_s": stats([r["server_s"] for r in crash[name]]),
                "broken_starts": [r["broken_starts"] for r in crash[name]],
                "load_1m": {"min": min(cl), "max": max(cl)},
                "reps": crash[name],
            }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    def ms(v):
        return "     -" if v is None else f"{v * 1000:6.0f}"

    print(
        f"\nReal-host update latency: dispatch -> hello at the new version (job succeeded), server timestamps, "
        f"{args.reps} reps each, interleaved"
    )
    print(f"agent interpreter: {args.agent_python}")
    print(f"uptime at start: {up_start}\nuptime at end:   {up_end}")
    print(
        f"\n{'configuration':52s} {'median':>6s} {'p90':>6s} {'min':>6s} {'max':>6s}"
        f"  load 1m (min-max)  <= {TARGET_S} s"
    )
    for name, *_ in configs:
        r = result[name]
        s = r["server_s"]
        met = "yes" if s["median"] <= TARGET_S else "no"
        print(
            f"{r['label']:52s} {ms(s['median'])} {ms(s['p90'])} {ms(s['min'])} {ms(s['max'])}  "
            f"{r['load_1m']['min']:.2f}-{r['load_1m']['max']:.2f}".ljust(20)
            + f"        {met}"
        )
    if args.crash_loop_reps:
        print("\nCrash-loop guard: dispatch of a signed B that exits 3 -> job failed 'crash-looped' (A restored)")
        for name, *_ in configs:
            r = result[name]
            c = r["crash_loop"]
            s = c["server_s"]
            print(
                f"{r['label']:52s} {ms(s['median'])} {ms(s['p90'])} {ms(s['min'])} {ms(s['max'])}  "
                f"{c['load_1m']['min']:.2f}-{c['load_1m']['max']:.2f}  broken starts {c['broken_starts']}"
            )
    for name, *_ in configs:
        print(f"\n{result[name]['label']}: breakdown, medians (ms)")
        for phase, v in result[name]["phases"].items():
            print(f"  {phase:44s} {ms(v)}")
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    log(f"[bench] done in {time.monotonic() - t0:.0f} s")
    sys.exit(code)
