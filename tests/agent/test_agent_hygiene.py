"""The agent stays a plain service: stdlib plus simple-websocket, nothing from the server's stack."""

import ast
import os
import subprocess
import sys

import agent

AGENT_DIR = os.path.dirname(agent.__file__)
FORBIDDEN = {"flask", "flask_sock", "werkzeug", "requests", "sqlalchemy", "app", "click", "jinja2", "waitress"}


def imported_roots(path):
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_no_agent_module_imports_the_server_stack():
    offenders = []
    for dirpath, _, filenames in os.walk(AGENT_DIR):
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                offenders += [(path, mod) for mod in imported_roots(path) if mod in FORBIDDEN]
    assert offenders == []


def test_importing_the_protocol_does_not_pull_in_the_websocket_stack():
    code = (
        "import sys, agent.protocol, agent.version; "
        "print(sorted(m for m in ('simple_websocket', 'wsproto') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(AGENT_DIR),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_the_agent_verifies_releases_without_the_cryptography_package():
    # cryptography is for the build side (signing); the agent's verifier is pure Python
    code = "import sys, agent.client, agent.signing, agent.recovery; print('cryptography' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(AGENT_DIR),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "False"
