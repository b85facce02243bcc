"""How the agent trusts the server: one TLS context (agent.tls) for the link and the download,
verified against the pinned ``server_ca`` or the system store, host name checked.

The link runs end to end in tests/e2e/test_agent_tls.py, the download against a real https
server in test_agent_updater.py (``test_an_https_download_…``), both with the run's test
certificates (tests/support/pki.py).
"""

from __future__ import annotations

import ast
import os
import ssl

import agent
from agent.tls import client_context

AGENT_DIR = os.path.dirname(agent.__file__)


def test_the_client_context_pins_only_the_given_ca_and_checks_host_names(pki):
    pinned = client_context(pki.ca)
    assert pinned.check_hostname and pinned.verify_mode == ssl.CERT_REQUIRED
    assert pinned.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in pinned.get_ca_certs()] == [((("commonName", "restic-manager test CA"),),)]
    system = client_context(None)
    assert system.check_hostname and system.verify_mode == ssl.CERT_REQUIRED


def test_only_agent_tls_builds_tls_contexts():
    """The link and the download must not drift apart: one helper makes every client context."""
    offenders = []
    for dirpath, _, files in os.walk(AGENT_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in ("create_default_context", "SSLContext"):
                    if os.path.relpath(path, AGENT_DIR) != "tls.py":
                        offenders.append(f"{os.path.relpath(path, AGENT_DIR)}:{node.lineno} {node.attr}")
    assert offenders == []
