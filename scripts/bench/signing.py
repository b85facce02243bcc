#!/usr/bin/env python3
"""How long the agent's pure-Python ed25519 check of a release signature takes.

    .venv/bin/python scripts/bench/signing.py [--reps 50]

The agent checks one signature per update (agent.signing.verify), so this is a per-update cost.
Printed beside it, as the baseline of the same run, the same check by ``cryptography`` (OpenSSL),
which the server uses and the agent cannot (the agent is stdlib only). Formerly a wall-clock
assertion in tests/agent/test_agent_signing.py (< 50 ms a check); timing belongs here, not in tests.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _common import per_call_ms  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: E402

from agent import signing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    pem, pub = signing.generate_keypair()
    manifest = signing.manifest_bytes("2.0.0", "py3-any", 123456, "cd" * 32)
    sig = signing.sign(pem, manifest)
    assert signing.verify(pub, manifest, sig)  # also builds the base point table once
    import base64

    raw_pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(pub))
    raw_sig = base64.b64decode(sig)

    def agent_check():
        assert signing.verify(pub, manifest, sig)

    ours = per_call_ms(agent_check, args.reps)
    base = per_call_ms(lambda: raw_pub.verify(raw_sig, manifest), args.reps)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.reps} checks each")
    print(f"agent.signing.verify (pure Python): {ours[0]:.2f} ms wall, {ours[1]:.2f} ms CPU per check")
    print(f"cryptography (OpenSSL), baseline:   {base[0]:.3f} ms wall, {base[1]:.3f} ms CPU per check")
    print(f"ratio (CPU): {ours[1] / max(base[1], 1e-6):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
