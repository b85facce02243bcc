"""How the agent trusts the server: one TLS context (agent.tls) for the link and the download,
verified against the pinned ``server_ca`` or the system store, host name checked.

The WebSocket side runs end to end in tests/e2e/test_agent_tls.py; here the download runs
against a real https server with the run's test certificates (tests/support/pki.py).
"""

from __future__ import annotations

import ast
import hashlib
import os
import ssl

import pytest

import agent
from agent import signing
from agent.tls import client_context
from agent.updater import UpdateCommand, UpdateError, Updater

OLD = b"#!/usr/bin/env python3\nold program\n"
NEW = os.urandom(50_000)
KEY_PEM, KEY_PUB = signing.generate_keypair()
AGENT_DIR = os.path.dirname(agent.__file__)


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(OLD)
    path.chmod(0o750)
    return path


def command(body=NEW, version="2.0.0"):
    sha256 = hashlib.sha256(body).hexdigest()
    signature = signing.sign(KEY_PEM, signing.manifest_bytes(version, "py3-any", len(body), sha256))
    return UpdateCommand(
        job_id="job-1",
        version=version,
        url=f"/agent/download/{version}",
        sha256=sha256,
        size=len(body),
        signature=signature,
    )


def updater(program, server, server_ca):
    return Updater(
        str(program),
        str(program.parent),
        f"wss://127.0.0.1:{server.port}",  # the download URL is a path: https on the same server
        "tok",
        "1.0.0",
        release_public_key=KEY_PUB,
        server_ca=server_ca,
    )


def test_the_download_runs_over_https_trusting_the_pinned_ca(program, artifact_server, pki):
    server = artifact_server(NEW, tls=pki.server)
    updater(program, server, pki.ca).run(command(), lambda *a: None)
    assert program.read_bytes() == NEW
    assert server.requests == [{"path": "/agent/download/2.0.0", "authorization": "Bearer tok"}]


@pytest.mark.parametrize(
    "impostor, pinned, why",
    [
        ("foreign", "ca", "unable to get local issuer certificate"),  # another CA's certificate
        ("wrong_name", "ca", "IP address mismatch"),  # the pinned CA's, for another name
        ("server", None, "unable to get local issuer certificate"),  # nothing pinned: the system store
    ],
)
def test_a_download_from_a_server_it_cannot_verify_is_refused_and_the_program_kept(
    program, artifact_server, pki, impostor, pinned, why
):
    server = artifact_server(NEW, tls=getattr(pki, impostor))
    with pytest.raises(UpdateError) as e:
        updater(program, server, pki.ca if pinned else None).run(command(), lambda *a: None)
    assert "certificate is not trusted" in str(e.value) and why in str(e.value)
    assert (pki.ca if pinned else "the system's CA store") in str(e.value)
    assert server.requests == []  # the request, and the agent token with it, never left
    assert program.read_bytes() == OLD
    assert not os.path.exists(str(program) + ".new") and not os.path.exists(str(program) + ".old")


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
