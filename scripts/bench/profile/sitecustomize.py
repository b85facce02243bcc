"""Profile a bench's ``serve`` process by CPU time, thread by thread (py-spy is not installed here).

    PYTHONPATH=scripts/bench/profile BENCH_PROFILE_OUT=/tmp/prof/p \\
        .venv/bin/python scripts/bench/fleet_rollout.py --hosts 500 --max-in-flight 50
    touch /tmp/prof/p.req-a        # a snapshot, written to /tmp/prof/p.a (e.g. at the POST)
    touch /tmp/prof/p.req-b        # another (before the bench stops the server: it exits with os._exit)
    .venv/bin/python scripts/bench/profile/sitecustomize.py /tmp/prof/p.a /tmp/prof/p.b   # b minus a

Python imports this module at start-up when its folder is on ``PYTHONPATH``; it does something
only in a ``serve`` process with ``BENCH_PROFILE_OUT`` set (the bench passes the variable on:
it drops only ``RM_*``). Every thread gets its own ``cProfile.Profile`` timed by
``time.thread_time`` (its CPU, not the wall clock it spent waiting for the GIL). A snapshot sums
all threads' stats; subtracting two gives the window between them. The profiler inflates the
absolute times several-fold; the shares are what to read. docs/benchmarks.md (issue 10) used it.
"""

from __future__ import annotations

import os
import sys

_OUT = os.environ.get("BENCH_PROFILE_OUT")


def _install(out: str) -> None:
    import cProfile
    import marshal
    import threading
    import time

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def new() -> cProfile.Profile:
        p = cProfile.Profile(timer=time.thread_time)
        with lock:
            profiles.append(p)
        return p

    def boot(frame, event, arg):  # the first event of every new thread: give it a profiler
        sys.setprofile(None)
        new().enable()

    def snapshot(path: str) -> None:
        total: dict = {}
        with lock:
            ps = list(profiles)
        for p in ps:
            p.snapshot_stats()
            for func, (cc, nc, tt, ct, callers) in p.stats.items():
                a = total.get(func)
                if a is None:
                    total[func] = (cc, nc, tt, ct, dict(callers))
                    continue
                merged = dict(a[4])
                for k, v in callers.items():
                    merged[k] = tuple(x + y for x, y in zip(merged[k], v, strict=True)) if k in merged else v
                total[func] = (a[0] + cc, a[1] + nc, a[2] + tt, a[3] + ct, merged)
        with open(path, "wb") as f:
            marshal.dump(total, f)

    def watch() -> None:
        sys.setprofile(None)
        folder, base = os.path.dirname(out) or ".", os.path.basename(out)
        while True:
            time.sleep(0.2)
            for name in os.listdir(folder):
                if name.startswith(base + ".req-"):
                    os.unlink(os.path.join(folder, name))
                    snapshot(f"{out}.{name[len(base) + 5 :]}")

    threading.setprofile(boot)
    new().enable()
    threading.Thread(target=watch, daemon=True, name="bench-profile").start()


def diff(a_path: str, b_path: str, top: int = 60) -> None:
    """Print the functions by cumulative CPU time between two snapshots (b minus a)."""
    import marshal
    import pstats
    import tempfile

    with open(a_path, "rb") as f:
        a = marshal.load(f)
    with open(b_path, "rb") as f:
        b = marshal.load(f)
    d = {}
    for func, (cc, nc, tt, ct, callers) in b.items():
        x = a.get(func)
        if x is None:
            d[func] = (cc, nc, tt, ct, callers)
            continue
        sub = {k: tuple(p - q for p, q in zip(v, x[4][k], strict=True)) if k in x[4] else v for k, v in callers.items()}
        d[func] = (cc - x[0], nc - x[1], tt - x[2], ct - x[3], sub)
    with tempfile.NamedTemporaryFile(suffix=".pstats") as f:
        marshal.dump(d, f)
        f.flush()
        pstats.Stats(f.name).sort_stats("cumulative").print_stats(top)


if _OUT and "serve" in sys.argv:
    _install(_OUT)

if __name__ == "__main__":
    diff(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 60)
