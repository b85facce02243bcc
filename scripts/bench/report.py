#!/usr/bin/env python3
"""What a rollout's run report costs at fleet size: build, JSON, CSV, SVG and the whole page.

    .venv/bin/python scripts/bench/report.py --hosts 1000 [--repeat 5] [--database-url URL]

A fresh migrated SQLite database in a temp dir (or ``--database-url``, e.g. a PostgreSQL schema
you own), one finished rollout of N hosts written at known times (``tests/support/rollouts.py``
``big_rollout``: waves of 50, every host with four recorded phases, some failures and waits), then
each step timed ``--repeat`` times (the median wall time, the worst, and the median CPU time of
this process, which a busy machine disturbs less): the three queries plus
the in-memory work (``report.build``), the JSON dict, the CSV, the SVG, and ``GET`` of the JSON,
the CSV and the page through the app (Flask's test client: routing, login session, template).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import ROOT, print_table  # noqa: E402

sys.path.insert(0, ROOT)


def timed(fn, repeat: int) -> tuple[float, float, float, object]:
    """Median and worst wall-clock ms, and the median CPU ms of this process (steadier on a busy machine)."""
    times, cpu, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return statistics.median(times), max(times), statistics.median(cpu), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--database-url")
    args = ap.parse_args()

    from app import create_app
    from app.extensions import db
    from app.models import User
    from app.updates import report
    from tests.support.dbsetup import migrate
    from tests.support.rollouts import big_rollout

    tmp = tempfile.mkdtemp(prefix="rm-bench-report-")
    try:
        url = args.database_url or "sqlite:///" + os.path.join(tmp, "bench.sqlite3")
        instance = os.path.join(tmp, "instance")
        migrate(url, instance)
        app = create_app(
            {
                "SQLALCHEMY_DATABASE_URI": url,
                "INSTANCE_PATH": instance,
                "SECRET_KEY": "bench",
                "VERSION": "2.0.0",
                "WTF_CSRF_ENABLED": False,
                "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1",
            },
            environ={},
        )
        with app.app_context():
            User.create("admin", "admin-pass-123", "viewer")
            db.session.commit()
            t = time.perf_counter()
            fid = big_rollout(args.hosts, dt.datetime(2026, 1, 1, 12, 0, 0))
            seed_ms = (time.perf_counter() - t) * 1000
            client = app.test_client()
            client.post("/login", data={"username": "admin", "password": "admin-pass-123"})

            def fresh_build():
                db.session.expire_all()
                return report.build(fid)

            rep = fresh_build()
            rows = [("hosts", args.hosts), ("seeding the rollout (ms, once)", seed_ms)]
            steps = [
                ("report.build: 3 queries + lines", fresh_build),
                ("to_dict (summary + hosts)", rep.to_dict),
                ("csv()", rep.csv),
                ("timeline_svg()", rep.timeline_svg),
                ("GET /api/fleet-updates/<id>/report", lambda: client.get(f"/api/fleet-updates/{fid}/report")),
                ("GET …/report.csv", lambda: client.get(f"/api/fleet-updates/{fid}/report.csv")),
                ("GET the report page", lambda: client.get(f"/settings/fleet-update/{fid}/report")),
            ]
            sizes = {}
            for name, fn in steps:
                med, worst, cpu, out = timed(fn, args.repeat)
                rows.append((f"{name}: median / max / CPU ms", f"{med:,.1f} / {worst:,.1f} / {cpu:,.1f}"))
                if hasattr(out, "status_code"):
                    assert out.status_code == 200, (name, out.status_code)
                    sizes[name] = len(out.get_data())
            rows.append(("SVG size (KiB)", round(len(str(rep.timeline_svg())) / 1024, 1)))
            for name, n in sizes.items():
                rows.append((f"{name}: body KiB", round(n / 1024, 1)))
            rows.append(("database", db.engine.url.get_backend_name()))
            rows.append(("load average (1 min) at the end", os.getloadavg()[0]))
            db.session.remove()
            db.engine.dispose()
        print_table(f"Run report over {args.hosts} hosts (repeat {args.repeat})", rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
