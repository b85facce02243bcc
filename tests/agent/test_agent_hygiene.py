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


def agent_imports():
    """Map each agent module to the agent modules it imports anywhere (lazy imports inside functions count)."""
    modules = {}
    for dirpath, _, filenames in os.walk(AGENT_DIR):
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(AGENT_DIR))[:-3]
                modules[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(dirpath, name)
    graph = {}
    for mod, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        # a package's own parent is not an edge: importing agent.updater.posix runs agent.updater first anyway
        graph[mod] = {m for m in found if m in modules and m != mod and not mod.startswith(m + ".")}
    return graph


def test_agent_modules_import_each_other_without_cycles():
    graph, cycles, done, path = agent_imports(), [], set(), []

    def visit(mod):
        path.append(mod)
        for dep in sorted(graph[mod]):
            if dep in path:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(graph):
        if mod not in done:
            visit(mod)
    assert cycles == []


def test_the_state_files_and_the_transport_sit_below_the_session():
    graph = agent_imports()
    assert graph["agent.statefile"] == set()  # recovery and updater both build on it
    assert graph["agent.transport"] == {"agent.protocol", "agent.tls"}
    assert graph["agent.tls"] == set()  # the link, the updater and the config check all build on it
    assert "agent.client" not in set().union(*(deps for mod, deps in graph.items() if mod != "agent.__main__"))


def test_only_agent_tls_builds_tls_contexts():
    """The link and the download must not drift apart: one helper makes every client context."""
    offenders = []
    for dirpath, _, filenames in os.walk(AGENT_DIR):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or os.path.relpath(path, AGENT_DIR) == "tls.py":
                continue
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), path)
            offenders += [
                (path, node.lineno, node.attr)
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr in ("create_default_context", "SSLContext")
            ]
    assert offenders == []


def run_python(code):
    """Run ``code`` in a fresh interpreter from the project root and return what it printed."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(AGENT_DIR),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def test_importing_the_protocol_does_not_pull_in_the_websocket_stack():
    code = (
        "import sys, agent.protocol, agent.version; "
        "print(sorted(m for m in ('simple_websocket', 'wsproto') if m in sys.modules))"
    )
    assert run_python(code) == "[]"


def test_the_agent_verifies_releases_without_the_cryptography_package():
    # cryptography is for the build side (signing); the agent's verifier is pure Python
    code = "import sys, agent.client, agent.signing, agent.recovery; print('cryptography' in sys.modules)"
    assert run_python(code) == "False"
