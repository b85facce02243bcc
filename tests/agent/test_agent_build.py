"""The zipapp build: reproducible bytes, the right contents, and a program that runs."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from agent.build import SHEBANG, BuildError, build_agent

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_agent("9.9.9-smoke", str(tmp_path_factory.mktemp("build-a")))


def test_building_twice_gives_identical_bytes(built, tmp_path):
    again = build_agent("9.9.9-smoke", str(tmp_path))
    assert again.sha256 == built.sha256
    assert again.size == built.size
    with open(built.path, "rb") as a, open(again.path, "rb") as b:
        assert a.read() == b.read()


def test_a_build_in_another_process_gives_identical_bytes(built, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agent.build", "--version", "9.9.9-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout)["sha256"] == built.sha256


def test_the_result_describes_the_file(built):
    assert os.path.basename(built.path) == "restic-manager-agent-9.9.9-smoke.pyz"
    with open(built.path, "rb") as fh:
        data = fh.read()
    assert built.sha256 == hashlib.sha256(data).hexdigest()
    assert built.size == len(data)
    assert (built.version, built.platform) == ("9.9.9-smoke", "py3-any")
    assert data.startswith(SHEBANG)
    assert os.stat(built.path).st_mode & 0o777 == 0o755


def test_the_archive_holds_the_agent_and_its_vendored_dependencies(built):
    with zipfile.ZipFile(built.path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        assert all(i.external_attr == 0o100644 << 16 for i in infos)
        assert zf.read("agent/_build_version.py") == b"VERSION = '9.9.9-smoke'\n"
        for name in (
            "__main__.py",
            "agent/client.py",
            "agent/updater/posix.py",
            "simple_websocket/ws.py",
            "wsproto/connection.py",
            "h11/_connection.py",
        ):
            assert name in names
            assert name + "c" in names
        assert not [n for n in names if "__pycache__" in n]
        assert "agent/_version.py" not in names  # setuptools-scm's file must not shadow the baked version
        assert not [n for n in names if n.startswith(("tests/", "flask", "werkzeug", "requests"))]
        pyc = zf.read("agent/client.pyc")
        import importlib.util

        assert pyc[:4] == importlib.util.MAGIC_NUMBER
        assert int.from_bytes(pyc[4:8], "little") == 0b01  # hash-based, unchecked


def test_the_zipapp_runs_and_prints_its_version(built, tmp_path):
    # How fast it starts is measured by scripts/bench/zipapp_startup.py (docs/benchmarks.md).
    proc = subprocess.run(
        [sys.executable, "-I", built.path, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "9.9.9-smoke"


def test_the_zipapp_imports_its_own_copy_of_the_dependencies(built, tmp_path):
    code = "import sys; sys.path.insert(0, sys.argv[1]); import simple_websocket; print(simple_websocket.__file__)"
    proc = subprocess.run([sys.executable, "-I", "-c", code, built.path], capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip().startswith(built.path), proc.stderr


@pytest.mark.parametrize("version", ["", "../evil", "1.0 beta", "a/b"])
def test_it_refuses_a_version_that_is_not_a_safe_file_name(version, tmp_path):
    with pytest.raises(BuildError, match="invalid version"):
        build_agent(version, str(tmp_path))


def test_it_refuses_an_unknown_platform(tmp_path):
    with pytest.raises(BuildError, match="unsupported platform"):
        build_agent("1.0.0", str(tmp_path), platform="linux-x86_64")
