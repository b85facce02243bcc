"""Start-up cost of the ``restic-manager`` console script: CPU time (user + sys) per invocation.

Runs the installed console script (beside this interpreter) N times for each case, on a throw-away
migrated SQLite database, and prints the median and minimum CPU time and wall time per case.
CPU time is what to compare on a loaded machine: load stretches wall time, not CPU time.

    .venv/bin/python scripts/bench/cli_startup.py [--runs 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, server_env

RESTIC_MANAGER = os.path.join(os.path.dirname(sys.executable), "restic-manager")

CASES = {
    "--help": ["--help"],
    "--version": ["--version"],
    "usage error (fleet start --bogus)": ["fleet", "start", "--bogus"],
    "fleet status (opens the database)": ["fleet", "status"],
    "hosts list --json (opens the database)": ["hosts", "list", "--json"],
}


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """Run the console script once; return (CPU seconds of the child, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([RESTIC_MANAGER, *args], cwd=ROOT, env=env, capture_output=True, timeout=120)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rm-bench-cli-") as tmp:
        env = server_env(os.path.join(tmp, "instance"), f"sqlite:///{tmp}/cli.sqlite3")
        subprocess.run([RESTIC_MANAGER, "db", "upgrade"], env=env, capture_output=True, check=True, timeout=300)
        results = {}
        for name, args in CASES.items():
            timed(args, env)  # warm the page cache
            runs = [timed(args, env) for _ in range(opts.runs)]
            cpu, wall = [r[0] for r in runs], [r[1] for r in runs]
            results[name] = {
                "cpu_median_s": round(statistics.median(cpu), 3),
                "cpu_min_s": round(min(cpu), 3),
                "wall_median_s": round(statistics.median(wall), 3),
            }
    load = os.getloadavg()
    if opts.json:
        print(json.dumps({"runs": opts.runs, "loadavg": load, "cases": results}, indent=2))
        return 0
    print(f"{opts.runs} runs each; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'case':<42} {'CPU median':>10} {'CPU min':>8} {'wall median':>11}")
    for name, r in results.items():
        print(f"{name:<42} {r['cpu_median_s']:>9.3f}s {r['cpu_min_s']:>7.3f}s {r['wall_median_s']:>10.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
