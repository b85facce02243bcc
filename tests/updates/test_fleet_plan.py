"""The rollout plan: which hosts a rollout takes, in order, which it leaves out and why.

``fleet.plan`` changes nothing; ``fleet.start`` builds its rollout from it, so what the plan says
(CLI ``fleet plan``, ``POST /api/fleet/plan``) is what a start does.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.errors import Refusal
from app.extensions import db
from app.models import AuditEvent, FleetUpdate, Host
from app.timeutil import utcnow
from app.updates import fleet
from tests.conftest import OLD_VERSION, SERVER_VERSION


def _host(name, version=OLD_VERSION, online=True, capabilities=("update",), revoked=False):
    host, _ = Host.enrol(name)
    host.agent_version, host.connected, host.capabilities = version, online, list(capabilities)
    if revoked:
        host.revoked_at = utcnow()
    db.session.commit()
    return host


@pytest.fixture
def mixed(cast):
    """Besides the cast (web-1 current online, db-1 current offline, app-1 behind online)."""
    return {
        "offline": _host("app-2", online=False),
        "cannot": _host("app-3", capabilities=()),
        "revoked": _host("app-4", revoked=True),
        "ahead": _host("app-5", version="3.0.0"),
        "never": _host("app-6", version=None, online=False, capabilities=()),
        "behind2": _host("app-7"),
    }


def _reasons(plan):
    return {lo.host.name: lo.reason for lo in plan.left_out}


def test_the_default_plan_takes_behind_updatable_online_hosts_by_name_and_says_why_it_leaves_out_the_rest(cast, mixed):
    plan = fleet.plan()
    assert [(p.host.name, p.position, p.wave) for p in plan.hosts] == [("app-1", 0, 0), ("app-7", 1, 1)]
    assert plan.policy == "sequential" and plan.target_version == SERVER_VERSION and not plan.explicit
    assert _reasons(plan) == {
        "app-2": "offline",
        "app-3": "cannot_update",
        "app-4": "revoked",
        "app-5": "ahead_of_target",
        "app-6": "never_connected",
        "db-1": "already_at_target",
        "web-1": "already_at_target",
    }
    details = {lo.host.name: lo.detail for lo in plan.left_out}
    assert "update" in details["app-3"] and "revoked" in details["app-4"]
    # The two the selector gives (excluded, not_selected) are tested in test_selection.py.
    assert set(fleet.LEFT_OUT_REASONS) - {"excluded", "not_selected"} == set(_reasons(plan).values())


def test_planning_changes_nothing(cast, mixed):
    audit_before = db.session.scalar(sa.select(sa.func.count(AuditEvent.id)))
    fleet.plan()
    fleet.plan([cast.host_behind.id])
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 0
    assert db.session.scalar(sa.select(sa.func.count(AuditEvent.id))) == audit_before


def test_start_takes_exactly_the_planned_hosts(cast, mixed):
    planned = [p.host.id for p in fleet.plan().hosts]
    fu = fleet.start("admin")
    assert [row.host_id for row in fu.hosts] == planned


def test_named_hosts_keep_their_order_and_offline_or_current_ones_stay_with_a_note(cast, mixed):
    ids = [mixed["offline"].id, cast.host_online.id, mixed["revoked"].id, cast.host_behind.id, mixed["cannot"].id]
    plan = fleet.plan(ids)
    assert plan.explicit
    assert [p.host.name for p in plan.hosts] == ["app-2", "web-1", "app-1"]
    notes = {p.host.name: p.note for p in plan.hosts}
    assert "offline" in notes["app-2"] and "halts" in notes["app-2"]
    assert "skips" in notes["web-1"] and notes["app-1"] is None
    assert _reasons(plan) == {"app-4": "revoked", "app-3": "cannot_update"}


def test_a_plan_that_updates_nothing_is_refused_with_the_reasons(cast, mixed):
    with pytest.raises(Refusal) as e:
        fleet.start("admin", host_ids=[cast.host_online.id, cast.host_offline.id])  # both already current
    assert (e.value.status, e.value.code) == (422, "no_hosts_to_update")
    assert "web-1, db-1 already run it" in e.value.message
    with pytest.raises(Refusal) as e:
        fleet.start("admin", host_ids=[mixed["revoked"].id, mixed["cannot"].id])
    assert (
        e.value.code == "no_hosts_to_update" and "1 revoked" in e.value.message and "1 cannot update" in e.value.message
    )
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 0


def test_bad_host_ids_are_refused_by_the_plan_as_by_start(cast):
    for bad, code in (([cast.host_behind.id, 424242], "unknown_host_ids"), (["x"], "invalid_host_ids")):
        with pytest.raises(Refusal) as e:
            fleet.plan(bad)
        assert e.value.code == code


def test_the_plan_api_answers_what_a_start_would_do(client, cast, mixed):
    from app.models import ApiToken

    _, admin = ApiToken.issue(cast.admin, "t")
    db.session.commit()
    r = client.post("/api/fleet/plan", json={}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    plan = r.get_json()["plan"]
    assert [h["name"] for h in plan["hosts"]] == ["app-1", "app-7"]
    assert {lo["name"]: lo["reason"] for lo in plan["left_out"]}["app-2"] == "offline"
    r = client.post(
        "/api/fleet/plan", json={"host_ids": [cast.host_behind.id]}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert [h["host_id"] for h in r.get_json()["plan"]["hosts"]] == [cast.host_behind.id]
    r = client.post("/api/fleet/plan", json={"host_ids": [999999]}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "unknown_host_ids"
    # Viewers get 403: tests/security/test_rbac_matrix.py, over real HTTP.
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 0
