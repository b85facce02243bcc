"""The command line's labels and rollout selector: ``hosts add --label``, ``hosts label``,
``hosts list --label`` and ``fleet plan|start --label --os --arch --older-than --host --exclude``.

In this process, through Flask's CLI runner on the test's database (tests/server/test_operator_cli.py
runs the console script itself for the same commands); exit codes as there: 0 succeeded, 1 refused,
2 usage error.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import AuditEvent, Host
from tests.conftest import OLD_VERSION


class Ran:
    """What a command did, in the shape of :func:`subprocess.run`'s result."""

    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


@pytest.fixture
def run(runner, cast):
    """Run a ``restic-manager`` command in this process, on the cast's database."""
    return lambda args: Ran(runner.invoke(args=args, catch_exceptions=False))


def test_fleet_plan_and_start_select_by_label_os_arch_version_and_exclusion(run, cast):
    for name, labels in (("app-2", {"env": "prod"}), ("app-3", {"env": "prod"}), ("app-4", {"env": "dev"})):
        host = cast._host(name, OLD_VERSION, True)[0]
        host.labels = labels
    db.session.commit()
    args = ["--label", "env=prod", "--os", "linux", "--arch", "x86_64", "--older-than", "1.5", "--exclude", "app-3"]
    r = run(["fleet", "plan", "--json", *args])
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert [h["name"] for h in plan["hosts"]] == ["app-2"]
    assert [(lo["name"], lo["reason"]) for lo in plan["left_out"]] == [("app-3", "excluded")]
    assert plan["selector"]["labels"] == {"env": "prod"} and plan["selector"]["older_than"] == "1.5"
    r = run(["fleet", "plan", *args])
    said = " ".join(r.stdout.split())  # rich wraps at the console's width
    assert "Selected: labels env=prod, os linux, arch x86_64, older than 1.5, excluding 1 host(s)" in said
    r = run(["fleet", "start", *args])
    assert r.returncode == 0 and "started over 1 host(s)" in r.stdout, r.stderr
    r = run(["fleet", "status", "--json"])
    assert json.loads(r.stdout)["fleet_update"]["selector"]["exclude_host_ids"] == [
        db.session.scalar(sa.select(Host.id).where(Host.name == "app-3"))
    ]


def test_bad_selector_options_are_usage_errors(run, cast):
    for args, message in (
        (["fleet", "plan", "--label", "env"], "write it key=value (invalid_labels)"),
        (["fleet", "start", "--label", "-x=1"], "bad label key '-x'"),
        (["fleet", "plan", "--older-than", "soon"], "older_than must be a version"),
        (["fleet", "plan", "--exclude", "nope"], "no host named 'nope'"),
    ):
        r = run(args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    r = run(["fleet", "start", "--label", "env=nowhere"])
    assert r.returncode == 1 and "no host matches the selector (labels env=nowhere)" in r.stderr


def _labels_of(name):
    db.session.expire_all()
    return db.session.scalar(sa.select(Host).where(Host.name == name)).labels


def test_hosts_add_label_and_list_by_label(run, cast):
    r = run(["hosts", "add", "edge-1", "--label", "env=prod", "--label", "tier=edge"])
    assert r.returncode == 0, r.stderr
    assert _labels_of("edge-1") == {"env": "prod", "tier": "edge"}
    r = run(["hosts", "label", "edge-1", "tier-", "zone=eu"])
    assert r.returncode == 0 and r.stdout.strip() == "env=prod zone=eu" and "changed" in r.stderr
    assert _labels_of("edge-1") == {"env": "prod", "zone": "eu"}
    r = run(["hosts", "label", "edge-1"])  # no edits: print them
    assert r.returncode == 0 and r.stdout.strip() == "env=prod zone=eu"
    r = run(["hosts", "label", "web-1", "env=prod"])
    assert r.returncode == 0
    r = run(["hosts", "list", "--label", "env=prod", "--json"])
    assert [h["name"] for h in json.loads(r.stdout)["hosts"]] == ["edge-1", "web-1"]
    r = run(["hosts", "list", "--label", "env=prod", "--label", "zone=eu"])
    assert "1 host(s)" in r.stdout and "edge-1" in r.stdout and "zone=eu" in r.stdout
    r = run(["hosts", "label", "edge-1", "--clear", "role=x"])
    assert r.stdout.strip() == "role=x" and _labels_of("edge-1") == {"role": "x"}
    audit = db.session.scalars(sa.select(AuditEvent).where(AuditEvent.action == "host.labels_changed")).all()
    assert [(e.actor, e.target) for e in audit] == [("cli", "edge-1"), ("cli", "web-1"), ("cli", "edge-1")]


def test_bad_labels_on_the_command_line_are_usage_errors_and_change_nothing(run, cast):
    for args, message in (
        (["hosts", "label", "web-1", "env"], "write it key=value"),
        (["hosts", "label", "web-1", "env=a", "env-"], "both set and removed"),
        (["hosts", "label", "nope", "env=a"], "no host named 'nope'"),
        (["hosts", "list", "--label", "=x"], "bad label key"),
    ):
        r = run(args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    r = run(["hosts", "add", "edge-1", "--label", "env=a b"])
    assert r.returncode == 1 and "bad value 'a b'" in r.stderr
    assert db.session.scalar(sa.select(Host.id).where(Host.name == "edge-1")) is None
    assert _labels_of("web-1") == {}
