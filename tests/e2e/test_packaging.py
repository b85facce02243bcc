"""The wheel is the product: build it, install it into a fresh venv, migrate, serve, log in.

The source tree is copied aside and built with ``python -m build --wheel`` (what a release does;
setuptools runs in an isolated build environment). The fresh venv gets the project only from
the wheel; its dependencies come from the test run's own environment through a path (``.pth``)
entry, so the test does not download them. That path holds no copy of the project (the test
run's install is editable, and an editable install's hook is not run from a plain path entry),
and the test proves it: in the fresh venv ``app`` and ``agent`` import from the venv's own
site-packages and no entry of ``sys.path`` is in the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import requests

from tests.support.live import ROOT
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

VERSION = "9.8.7"
IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "instance",
    "__pycache__",
    "*.pyc",
    "build",
    "dist",
    "*.egg-info",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "test-artifacts",
    "_version.py",
)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RM_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src") / "restic-manager"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
        env=clean_env(SETUPTOOLS_SCM_PRETEND_VERSION=VERSION),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    build_output = r.stdout + r.stderr
    # setuptools says nothing about data it had to guess at (issue 12: ~40 "Package ... is absent" warnings)
    for bad in ("is absent from the `packages` configuration", "SetuptoolsDeprecationWarning", "Installing '"):
        assert bad not in build_output, build_output[-4000:]
    (path,) = out.glob("restic_manager-*.whl")
    return str(path)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("venv") / "rm"
    # No pip inside (ensurepip is most of a venv's cost): the run's own pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=120)
    py = str(home / "bin" / "python")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies, from the test run's environment (a plain path entry: its .pth hooks do not run).
    with open(os.path.join(purelib, "zz-test-dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return str(home)


def test_the_wheel_carries_templates_static_files_migrations_and_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "app/templates/base.html",
        "app/templates/auth/login.html",
        "app/static/app.css",
        "app/static/htmx.min.js",
        "app/migrations/env.py",
        "app/migrations/alembic.ini",
        "app/migrations/script.py.mako",
        "app/migrations/versions/0001_foundation.py",
        "agent/scripts/install-agent.sh",
        "agent/scripts/systemd/restic-manager-agent.service",
        "agent/scripts/systemd/restic-manager-agent-guard",
    ):
        assert needed in names, needed
    migrations = {n for n in names if re.match(r"app/migrations/versions/\d{4}_\w+\.py$", n)}
    assert len(migrations) == len(os.listdir(os.path.join(ROOT, "migrations", "versions"))) - (
        1 if os.path.isdir(os.path.join(ROOT, "migrations", "versions", "__pycache__")) else 0
    )
    assert not any(n.startswith(("tests/", "scripts/bench")) for n in names)


def test_the_installed_wheel_migrates_serves_and_shows_the_login_page(venv, tmp_path):
    bin_dir = os.path.join(venv, "bin")
    work = tmp_path / "ops"
    work.mkdir()
    env = clean_env(RM_HTTP_ADDR="127.0.0.1:0", RM_AGENT_ADDR="127.0.0.1:0")

    # The project comes from the venv, not from the source tree.
    probe = subprocess.run(
        [
            os.path.join(bin_dir, "python"),
            "-c",
            "import app, agent, sys; print(app.__file__); print(agent.__file__); print('\\n'.join(sys.path))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert probe[0].startswith(venv) and probe[1].startswith(venv), probe[:2]
    paths = [os.path.realpath(p or str(work)) for p in probe[2:]]
    assert os.path.realpath(ROOT) not in paths, paths
    # Only the venv's site-packages holds the packages: no entry reaches the source tree's copy.
    providers = [p for p in paths if os.path.exists(os.path.join(p, "app", "__init__.py"))]
    assert providers == [os.path.dirname(os.path.dirname(os.path.realpath(probe[0])))], providers

    def rm(*args, **kw):
        return subprocess.run(
            [os.path.join(bin_dir, "restic-manager"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **kw,
        )

    r = rm("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"restic-manager {VERSION}"
    r = rm("hosts", "list")
    assert r.returncode == 1 and "restic-manager db upgrade" in r.stderr and "Traceback" not in r.stderr
    r = rm("db", "upgrade")
    assert r.returncode == 0, r.stderr
    assert (work / "instance" / "restic-manager.sqlite3").is_file()  # RM_INSTANCE_PATH's default: ./instance
    r = rm("users", "create", "alice", "--role", "admin", "--password-stdin", input="correct horse battery\n")
    assert r.returncode == 0, r.stderr

    ready = work / "ready"
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "restic-manager"), "serve", "--ready-file", str(ready)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:

        def listening():
            assert proc.poll() is None, (work / "serve.log").read_text()[-4000:]
            return ready.exists() and len(ready.read_text().split()) == 2 and ready.read_text().split()

        admin_port, agent_port = wait_until(listening, 120, 0.1, "serve to listen")
        base = f"http://127.0.0.1:{admin_port}"
        page = requests.get(base + "/login", timeout=10)
        assert page.status_code == 200 and 'name="password"' in page.text
        css = re.search(r'href="(/static/app\.css[^"]*)"', page.text).group(1)
        assert requests.get(base + css, timeout=10).status_code == 200
        script = requests.get(f"http://127.0.0.1:{agent_port}/agent/install.sh", timeout=10)
        assert script.status_code == 200 and script.text.startswith("#!")
        # serve built this version's agent from the installed package
        assert (work / "instance" / "releases" / f"restic-manager-agent-{VERSION}.pyz").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
