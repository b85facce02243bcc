"""The README's "Running it for real", followed command by command, ends with an agent that updates itself.

Each command of the README's block runs as written, in order, as its own process, with these
stand-ins (and nothing else added):

- ``pip install .`` is not run: this test runs in an environment that has the project installed
  (tests/e2e/test_packaging.py installs the built wheel into a fresh venv);
- ``RM_INSTANCE_PATH`` points into the test's temporary folder, and ``<base64>`` is the key the
  ``release-key`` command printed;
- the environment also sets both planes' addresses to free loopback ports and ``RM_VERSION`` to
  2.0.0, so that the agent the test runs (built as 1.0.0) is behind the server;
- ``users create`` gets ``--password-stdin`` (the README's "(or --password-stdin)");
- ``serve`` gets ``--ready-file``, and the install one-liner's work (a systemd unit with the
  token and the release key) is done by a test supervisor running the agent zipapp with the
  config the one-liner would write, from the one-liner's own ``--server``/``--token``/``--release-key``.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest
import requests

from tests.support.live import ROOT, AgentProcess, built_agent
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

A, B = "1.0.0", "2.0.0"


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Running it for real", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [re.split(r"\s{2,}#", line, maxsplit=1)[0].strip() for line in block.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(proc, ready) -> bool:
    assert proc.poll() is None, "serve exited"
    return ready.exists() and len(ready.read_text().split()) == 2


def test_the_readme_path_gives_an_agent_that_can_update_itself(tmp_path, tmp_path_factory):
    commands = readme_commands()
    assert commands[0] == "pip install ."
    work = tmp_path / "ops"
    work.mkdir()
    admin_port, agent_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    env.update(RM_HTTP_ADDR=f"127.0.0.1:{admin_port}", RM_AGENT_ADDR=f"127.0.0.1:{agent_port}", RM_VERSION=B)
    exe = os.path.join(os.path.dirname(sys.executable), "restic-manager")
    seen: dict[str, str] = {}
    server = None
    ready = work / "ready"
    try:
        for line in commands[1:]:
            if line.startswith("export "):
                name, value = line[len("export ") :].split("=", 1)
                value = {"/var/lib/restic-manager": str(work / "instance"), "<base64>": seen.get("public_key")}[value]
                assert value, f"{line}: nothing printed it before"
                env[name] = value
                continue
            args = shlex.split(line)
            assert args[0] == "restic-manager", line
            args[0] = exe
            if args[1] == "serve":
                log = open(work / "serve.log", "wb")
                server = subprocess.Popen(
                    [*args, "--ready-file", str(ready)], cwd=work, env=env, stdout=log, stderr=log
                )
                log.close()
                wait_until(functools.partial(listening, server, ready), 60, 0.1, "serve to listen")
                continue
            stdin = None
            if args[1:3] == ["users", "create"]:
                args.append("--password-stdin")
                stdin = "correct horse battery staple\n"
            r = subprocess.run(args, cwd=work, env=env, input=stdin, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (line, r.stdout, r.stderr)
            if args[1] == "release-key":
                seen["public_key"] = re.search(r'release_public_key = "([^"]+)"', r.stdout).group(1)
            elif args[1:3] == ["hosts", "add"]:
                assert "WARNING" not in r.stderr, r.stderr
                seen["install"] = re.search(r"^install: (.+)$", r.stdout, re.M).group(1)
            elif args[1:3] == ["tokens", "create"]:
                seen["api_token"] = r.stdout.strip()
            elif args[1] == "build-agent":
                artifact = os.path.join(work, r.stdout.split()[0])
                assert os.path.isfile(artifact + ".sig"), "the agent release is signed"
        assert server is not None, "the README never starts the server"

        # The one-liner pins the release key, so the agent it installs can update itself.
        one_liner = shlex.split(seen["install"].split("| sudo sh -s --", 1)[1])
        opts = dict(zip(one_liner[::2], one_liner[1::2], strict=True))
        assert opts["--release-key"] == seen["public_key"]
        assert opts["--server"] == f"ws://127.0.0.1:{agent_port}"
        agent = AgentProcess(
            str(tmp_path / "web-1"), built_agent(A, str(tmp_path_factory.getbasetemp() / "agent-builds")), "", ""
        )
        with open(agent.config, "w") as f:  # what install-agent.sh writes from the one-liner
            f.write(
                f'server_url = "{opts["--server"]}"\ntoken = "{opts["--token"]}"\n'
                f'release_public_key = "{opts["--release-key"]}"\nbackoff_max_s = 1\n'
            )
        agent.start()
        try:
            api = requests.Session()
            api.headers["Authorization"] = f"Bearer {seen['api_token']}"
            base = f"http://127.0.0.1:{admin_port}"

            def host():
                hosts = api.get(base + "/api/hosts", timeout=10).json()["hosts"]
                return hosts[0] if hosts and hosts[0]["online"] else None

            web1 = wait_until(host, 30, 0.1, "web-1 online")
            assert web1["name"] == "web-1" and web1["agent_version"] == A and web1["capabilities"] == ["update"]
            r = api.post(f"{base}/api/hosts/{web1['id']}/update", json={}, timeout=10)
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]

            def ended():
                job = api.get(f"{base}/api/jobs/{job_id}", timeout=10).json()["job"]
                return job if job["status"] != "running" else None

            assert wait_until(ended, 60, 0.1, "the update")["status"] == "succeeded"
            assert wait_until(host, 30, 0.1, "web-1 back")["agent_version"] == B
        finally:
            agent.stop()
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
