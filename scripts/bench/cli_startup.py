"""Start-up cost of the ``restic-manager`` console script: CPU time (user + sys) per invocation.

Runs the installed console script (beside this interpreter) N times for each case, on a throw-away
migrated SQLite database, and prints the median and minimum CPU time and wall time per case.
CPU time is what to compare on a loaded machine: load stretches wall time far more than CPU time.

With ``--checkout DIR`` (repeatable) it runs ``python -c "from app.cli import main; main()"`` in
each DIR instead (that checkout's code, this interpreter and venv), alternating the checkouts run
by run so that each meets the same load: a before/after pair on a shared machine.

    .venv/bin/python scripts/bench/cli_startup.py [--runs 7] [--json] [--checkout DIR ...]
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


def timed(args: list[str], env: dict, checkout: str | None = None) -> tuple[float, float]:
    """Run the command once; return (CPU seconds of the child, wall seconds)."""
    command = [RESTIC_MANAGER] if checkout is None else [sys.executable, "-c", "from app.cli import main; main()"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([*command, *args], cwd=checkout or ROOT, env=env, capture_output=True, timeout=120)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--checkout", action="append", metavar="DIR", help="Run this checkout's code (repeatable).")
    opts = ap.parse_args()
    checkouts = [os.path.abspath(c) for c in opts.checkout] if opts.checkout else [None]
    with tempfile.TemporaryDirectory(prefix="rm-bench-cli-") as tmp:
        env = server_env(os.path.join(tmp, "instance"), f"sqlite:///{tmp}/cli.sqlite3")
        subprocess.run([RESTIC_MANAGER, "db", "upgrade"], env=env, capture_output=True, check=True, timeout=300)
        results = {}
        for name, args in CASES.items():
            runs: dict = {c: [] for c in checkouts}
            for c in checkouts:
                timed(args, env, c)  # warm the page cache
            for _ in range(opts.runs):
                for c in checkouts:
                    runs[c].append(timed(args, env, c))
            for c in checkouts:
                cpu, wall = [r[0] for r in runs[c]], [r[1] for r in runs[c]]
                results[name if c is None else f"{name} @ {os.path.basename(c)}"] = {
                    "cpu_median_s": round(statistics.median(cpu), 3),
                    "cpu_min_s": round(min(cpu), 3),
                    "wall_median_s": round(statistics.median(wall), 3),
                }
    load = os.getloadavg()
    if opts.json:
        print(json.dumps({"runs": opts.runs, "loadavg": load, "cases": results}, indent=2))
        return 0
    print(f"{opts.runs} runs each; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    width = max(len(name) for name in results)
    print(f"{'case':<{width}} {'CPU median':>10} {'CPU min':>8} {'wall median':>11}")
    for name, r in results.items():
        print(f"{name:<{width}} {r['cpu_median_s']:>9.3f}s {r['cpu_min_s']:>7.3f}s {r['wall_median_s']:>10.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
