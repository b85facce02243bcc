#!/usr/bin/env python3
"""A FIFO model of a reconnect storm: when is the last of N agents welcomed after a SIGTERM?

    python3 scripts/bench/storm_model.py [--agents 2000] [--listen 4.5] [--seeds 5]

The server is a single queue that welcomes ``R`` agents a second once it listens (``--listen`` s
after the SIGTERM); every agent got the 1001 close at 0.5 s and reconnects after 0-0.5 s; a
connect before the listen is refused. An agent that would wait in the listen backlog longer than
its 10 s connect timeout gives up (the server skips it at no cost) and retries on the ladder.
Reconnect rules compared: the full-jitter ladder (0.5 s x 2^n, cap 10 s) for every failure, and
the agent's 1001 rule (a refusal is retried within 0-W s without climbing). It prints the last
welcome after SIGTERM and the timeouts, per rate and rule (docs/capacity.md).
"""

from __future__ import annotations

import argparse
import heapq
import random

CAP_S = 10.0
BASE_S = 0.5
TIMEOUT_S = 10.0


def storm(n: int, rate: float, listen: float, window: float | None, seed: int) -> tuple[float, int]:
    """Return (last welcome after SIGTERM, timeouts); ``window`` None: the plain ladder."""
    rnd = random.Random(seed)
    attempt = [1] * n
    events = [(0.5 + rnd.random() * BASE_S, i) for i in range(n)]
    heapq.heapify(events)
    free_at, last, timeouts = listen, 0.0, 0

    def ladder(i: int) -> float:
        ceiling = min(CAP_S, BASE_S * 2 ** attempt[i])
        attempt[i] += 1
        return rnd.random() * ceiling

    while events:
        t, i = heapq.heappop(events)
        if t < listen:  # refused: nothing listens yet
            heapq.heappush(events, (t + (ladder(i) if window is None else rnd.random() * window), i))
            continue
        start = max(t, free_at)
        if start - t > TIMEOUT_S:
            timeouts += 1
            heapq.heappush(events, (t + TIMEOUT_S + ladder(i), i))
            continue
        free_at = start + 1.0 / rate
        last = max(last, free_at)
    return last, timeouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--listen", type=float, default=4.5, help="s from SIGTERM until the new server listens")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    rules = [("old ladder", None), ("retry 0-2 s", 2.0), ("retry 0-4 s", 4.0), ("retry 0-6 s", 6.0)]
    print("R/s   " + "".join(f"{name:>22}" for name, _ in rules))
    for rate in (120, 160, 200, 250, 350, 500):
        cells = []
        for _, window in rules:
            runs = [storm(args.agents, rate, args.listen, window, seed) for seed in range(args.seeds)]
            last = sum(r[0] for r in runs) / len(runs)
            timeouts = sum(r[1] for r in runs) / len(runs)
            cells.append(f"{last:6.1f} s ({timeouts:4.0f} to)")
        print(f"{rate:<6}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
