#!/usr/bin/env python3
"""What the agent plane's token check costs per connection: ``Host.id_and_name_by_token``.

    RM_BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        .venv/bin/python scripts/bench/token_lookup.py [--hosts 10000] [--reps 3000]

PostgreSQL only (``--database-url`` or ``RM_BENCH_DATABASE_URL``; the bench drops and owns the
schema ``rm_bench_tokens`` there): on SQLite the check goes through the session as before.

Every agent connection asks it once, before its WebSocket handshake, so in a reconnect storm it
runs 10,000 times in 20 s. The lookup runs on its own pooled connection in autocommit: one round
trip. Printed beside it, as the baseline of the same run, the same read through the request's
session, as it was before (issue 13, fifth pass): ``BEGIN``, the ``SELECT`` and the ``ROLLBACK``
of the session's close, three round trips, each one a hand-off of the GIL under load. Wall and
CPU (this process's: the client side; PostgreSQL's own work is not in it) per lookup, the mean
over ``--reps`` lookups of distinct tokens, alternated twice so that neither gets the warm cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--database-url", default=os.environ.get("RM_BENCH_DATABASE_URL"))
    ap.add_argument("--schema", default="rm_bench_tokens", help="schema dropped and created on --database-url")
    args = ap.parse_args()
    if args.reps < 1 or args.hosts < 1:
        ap.error("--hosts and --reps must be at least 1")
    if not (args.database_url or "").startswith("postgresql"):
        ap.error("needs a PostgreSQL URL (--database-url or RM_BENCH_DATABASE_URL): SQLite's check is the session's")

    import sqlalchemy as sa
    from _common import per_call_ms
    from cluster_dispatch import pg_schema_url

    from app import create_app
    from app.extensions import db
    from app.models import Host, _host_by_token, hash_token

    tmp = tempfile.mkdtemp(prefix="rm-bench-tokens-")
    url = pg_schema_url(args.database_url, args.schema)
    app = create_app({"SQLALCHEMY_DATABASE_URI": url, "INSTANCE_PATH": tmp, "TESTING": True})
    with app.app_context():
        db.create_all()
        tokens = []
        for i in range(args.hosts):
            _, plain = Host.enrol(f"bench-{i:05d}")
            tokens.append(plain)
        db.session.commit()
        db.session.close()

        def session(token: str):  # the baseline: the same read through the session, then its close
            try:
                row = db.session.execute(_host_by_token(), {"token_hash": hash_token(token)}).first()
                return (row.id, row.name) if row is not None else None
            finally:
                db.session.close()

        results: dict[str, list[tuple[float, float]]] = {"session": [], "autocommit": []}
        for _ in range(2):
            for name, fn in (("session", session), ("autocommit", Host.id_and_name_by_token)):
                picks = iter([tokens[i % len(tokens)] for i in range(args.reps)])

                def lookup(fn=fn, name=name, picks=picks) -> None:
                    if fn(next(picks)) is None:
                        raise SystemExit(f"error: {name} lookup found no host for an enrolled token")

                results[name].append(per_call_ms(lookup, args.reps))
        db.session.execute(sa.text(f"DROP SCHEMA IF EXISTS {args.schema} CASCADE"))
        db.session.commit()
        db.engine.dispose()
    shutil.rmtree(tmp, ignore_errors=True)

    def best(name: str) -> tuple[float, float]:
        return min(w for w, _ in results[name]), min(c for _, c in results[name])

    (sw, sc), (aw, ac) = best("session"), best("autocommit")
    print(f"token lookup on PostgreSQL, {args.hosts} hosts, {args.reps} lookups a series (best of 2)")
    print(f"  session (baseline: BEGIN, SELECT, ROLLBACK)  wall {sw:.3f} ms  CPU {sc:.3f} ms per lookup")
    print(f"  own connection in autocommit (SELECT)        wall {aw:.3f} ms  CPU {ac:.3f} ms per lookup")
    print(f"  ratio baseline / autocommit                  wall {sw / aw:.2f}x  CPU {sc / ac:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
