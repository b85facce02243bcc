#!/usr/bin/env python3
"""How long the agent zipapp takes to start: ``python -I agent.pyz --version``, wall and CPU time.

    .venv/bin/python scripts/bench/zipapp_startup.py [--runs 9]

Builds the zipapp from this tree (``agent.build.build_agent``) into a temp folder, then runs it N
times and prints the median and minimum wall time and CPU time (user + sys of the child) per run.
CPU time is what to compare on a loaded machine. Formerly a wall-clock assertion in
tests/agent/test_agent_build.py (< 2 s a run); timing belongs here, not in tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from agent.build import build_agent  # noqa: E402


def one_run(path: str, cwd: str) -> tuple[float, float]:
    """(wall s, CPU s) of one ``--version`` run of the zipapp at ``path``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-I", path, "--version"], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or proc.stdout.strip() != "9.9.9-bench":
        raise SystemExit(f"the zipapp failed: {proc.returncode} {proc.stdout!r} {proc.stderr!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rm-zipapp-bench-") as tmp:
        built = build_agent("9.9.9-bench", tmp)
        one_run(built.path, tmp)  # warm the page cache: measure the start, not the disk
        runs = [one_run(built.path, tmp) for _ in range(args.runs)]
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    print(f"zipapp {built.size} bytes, {args.runs} runs of --version, load {os.getloadavg()[0]:.1f}")
    print(f"  wall ms: median {statistics.median(walls) * 1000:.0f}  min {min(walls) * 1000:.0f}")
    print(f"  CPU ms:  median {statistics.median(cpus) * 1000:.0f}  min {min(cpus) * 1000:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
