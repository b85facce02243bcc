"""The rollout selector: parsing a request body, matching hosts, and what the plan makes of it.

Runs on the test database (SQLite, or PostgreSQL with RM_TEST_DATABASE_URL): the label criteria
are narrowed in SQL (JSON path extraction) and must agree on both.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app import labels as host_labels
from app.errors import Refusal
from app.extensions import db
from app.models import AuditEvent, FleetUpdate, Host
from app.timeutil import utcnow
from app.updates import fleet
from app.updates.selection import FIELDS, Selector
from tests.conftest import OLD_VERSION, SERVER_VERSION


def _host(name, version=OLD_VERSION, labels=None, os="linux", arch="x86_64", online=True, revoked=False):
    host, _ = Host.enrol(name)
    host.agent_version, host.connected, host.capabilities = version, online, ["update"]
    host.os, host.arch, host.labels = os, arch, dict(labels or {})
    if revoked:
        host.revoked_at = utcnow()
    db.session.commit()
    return host


@pytest.fixture
def fleet_hosts(cast):
    """Besides the cast (web-1 and db-1 current, app-1 behind, all linux/x86_64 without labels)."""
    return {
        "prod-a": _host("prod-a", labels={"env": "prod", "tier": "web"}),
        "prod-b": _host("prod-b", labels={"env": "prod", "tier": "db"}, arch="aarch64"),
        "prod-win": _host("prod-win", labels={"env": "prod"}, os="windows"),
        "stage-a": _host("stage-a", labels={"env": "staging", "tier": "web"}),
        "old-a": _host("old-a", version="0.9.0", labels={"env": "prod", "k8s.io/zone": "eu-1"}),
        "prod-current": _host("prod-current", version=SERVER_VERSION, labels={"env": "prod"}),
    }


def _names(hosts):
    return [h.name for h in hosts]


# --- parsing ------------------------------------------------------------------------------------


def test_an_empty_body_selects_every_host_and_stores_as_an_empty_object():
    s = Selector.from_body({})
    assert s == Selector() and s.to_dict() == {} and not s.explicit and s.describe() == "every host"
    assert Selector.from_body(None) == s


def test_every_field_round_trips_through_to_dict():
    body = {
        "labels": {"env": "prod", "k8s.io/zone": "eu-1"},
        "os": "linux",
        "arch": "x86_64",
        "older_than": "1.4.0",
        "host_ids": [3, 1, 2],
        "exclude_host_ids": [2],
    }
    s = Selector.from_body(body)
    assert s.to_dict() == body and Selector.from_body(s.to_dict()) == s
    assert s.explicit and s.host_ids == (3, 1, 2)
    assert s.describe() == (
        "labels env=prod k8s.io/zone=eu-1, os linux, arch x86_64, older than 1.4.0, 3 named host(s), "
        "excluding 1 host(s)"
    )


def test_the_default_version_criterion_may_be_named_and_other_fields_of_the_body_are_not_its_business():
    s = Selector.from_body({"version": "behind", "canary": 2, "max_in_flight": "10%"})
    assert s.to_dict() == {}
    assert set(FIELDS) >= {"labels", "os", "arch", "older_than", "host_ids", "exclude_host_ids"}


@pytest.mark.parametrize(
    "body, code, words",
    [
        ({"labels": ["env=prod"]}, "invalid_labels", "JSON object"),
        ({"labels": {"env": 1}}, "invalid_labels", "must be a string"),
        ({"labels": {"-env": "prod"}}, "invalid_labels", "bad label key"),
        ({"labels": {"env": "pr od"}}, "invalid_labels", "bad value"),
        ({"labels": {"k" * 64: "v"}}, "invalid_labels", "1 to 63"),
        ({"labels": {"env": "v" * 64}}, "invalid_labels", "at most 63"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "invalid_labels", "at most 32"),
        ({"os": 7}, "invalid_selector", "os must be"),
        ({"os": ""}, "invalid_selector", "os must be"),
        ({"arch": "x" * 65}, "invalid_selector", "arch must be"),
        ({"arch": "x86\n64"}, "invalid_selector", "arch must be"),
        ({"os": "linux\n"}, "invalid_selector", "os must be"),
        ({"version": "ahead"}, "invalid_selector", "behind"),
        ({"older_than": "not a version"}, "invalid_selector", "older_than must be a version"),
        ({"older_than": 1.4}, "invalid_selector", "older_than must be"),
        ({"older_than": "1.4.0\n"}, "invalid_selector", "older_than must be"),
        ({"older_than": "v1.4"}, "invalid_selector", "older_than must be"),
        ({"host_ids": []}, "invalid_host_ids", "host_ids must list"),
        ({"host_ids": [1, True]}, "invalid_host_ids", "host_ids must list"),
        ({"host_ids": [2**31]}, "invalid_host_ids", "1 to 2147483647"),
        ({"host_ids": [1, 1]}, "invalid_host_ids", "more than once"),
        ({"exclude_host_ids": "3"}, "invalid_host_ids", "exclude_host_ids must list"),
        ({"exclude_host_ids": [0]}, "invalid_host_ids", "exclude_host_ids must list"),
    ],
)
def test_bad_fields_are_refused_with_a_typed_400(body, code, words):
    with pytest.raises(Refusal) as e:
        Selector.from_body(body)
    assert (e.value.status, e.value.code) == (400, code)
    assert words in e.value.message


def test_an_empty_exclusion_list_is_no_exclusion():
    assert Selector.from_body({"exclude_host_ids": []}).to_dict() == {}


# --- matching -----------------------------------------------------------------------------------


def test_labels_must_all_match(cast, fleet_hosts):
    assert fleet_hosts["prod-a"].matches_labels({"env": "prod", "tier": "web"})
    assert fleet_hosts["prod-a"].matches_labels({})
    assert not fleet_hosts["prod-a"].matches_labels({"env": "prod", "tier": "db"})
    assert not fleet_hosts["prod-a"].matches_labels({"env": "Prod"})  # case-sensitive
    assert not cast.host_behind.matches_labels({"env": "prod"})
    chosen = Selector.from_body({"labels": {"env": "prod", "tier": "web"}}).select()
    assert _names(chosen.hosts) == ["prod-a"] and chosen.left_out == []


def test_the_fleet_selection_narrows_by_labels_os_arch_and_version_in_name_order(cast, fleet_hosts):
    def picked(body):
        return _names(Selector.from_body(body).select().hosts)

    assert picked({"labels": {"env": "prod"}}) == ["old-a", "prod-a", "prod-b", "prod-current", "prod-win"]
    assert picked({"labels": {"env": "prod"}, "os": "linux"}) == ["old-a", "prod-a", "prod-b", "prod-current"]
    assert picked({"labels": {"env": "prod"}, "arch": "aarch64"}) == ["prod-b"]
    assert picked({"older_than": "1.0.0"}) == ["old-a"]
    assert picked({"older_than": "1.0.1"}) == ["app-1", "old-a", "prod-a", "prod-b", "prod-win", "stage-a"]
    assert picked({"labels": {"k8s.io/zone": "eu-1"}}) == ["old-a"]
    assert picked({"labels": {"env": "qa"}}) == []
    assert picked({}) == _names(db.session.scalars(sa.select(Host).order_by(Host.name)))


def test_a_label_with_an_empty_value_matches_only_that_empty_value(cast, fleet_hosts):
    _host("blank", labels={"canary": ""})
    assert _names(Selector.from_body({"labels": {"canary": ""}}).select().hosts) == ["blank"]


def test_named_hosts_keep_their_order_and_those_not_matching_are_left_out_with_the_reason(cast, fleet_hosts):
    h = fleet_hosts
    body = {"host_ids": [h["stage-a"].id, h["prod-b"].id, h["prod-a"].id, h["prod-win"].id], "labels": {"env": "prod"}}
    body["os"] = "linux"
    chosen = Selector.from_body(body).select()
    assert _names(chosen.hosts) == ["prod-b", "prod-a"]
    why = {host.name: (reason, detail) for host, reason, detail in chosen.left_out}
    reason, detail = why["stage-a"]
    assert reason == "not_selected" and "lacks the labels env=prod" in detail and "env=staging" in detail
    assert why["prod-win"] == ("not_selected", "host prod-win runs windows, not linux")


def test_excluded_hosts_are_left_out_by_name_whether_named_or_not(cast, fleet_hosts):
    h = fleet_hosts
    chosen = Selector.from_body({"labels": {"env": "prod"}, "exclude_host_ids": [h["prod-b"].id]}).select()
    assert "prod-b" not in _names(chosen.hosts)
    assert [(host.name, reason) for host, reason, _ in chosen.left_out] == [("prod-b", "excluded")]
    named = Selector.from_body({"host_ids": [h["prod-a"].id, h["prod-b"].id], "exclude_host_ids": [h["prod-b"].id]})
    chosen = named.select()
    assert _names(chosen.hosts) == ["prod-a"] and [r for _, r, _ in chosen.left_out] == ["excluded"]


def test_ids_of_no_host_are_refused_with_422_naming_them(cast):
    for body in ({"host_ids": [cast.host_behind.id, 424242]}, {"exclude_host_ids": [424242, 424243]}):
        with pytest.raises(Refusal) as e:
            Selector.from_body(body).select()
        assert (e.value.status, e.value.code) == (422, "unknown_host_ids") and "424242" in e.value.message


def test_older_than_leaves_out_hosts_that_never_reported_a_version(cast):
    never = _host("never", version=None)
    chosen = Selector.from_body({"older_than": "9.0.0", "host_ids": [never.id]}).select()
    assert chosen.hosts == [] and "never reported a version" in chosen.left_out[0][2]


# --- the plan and the rollout -----------------------------------------------------------------


def test_the_plan_lists_excluded_hosts_and_the_usual_reasons_for_the_selected_ones(cast, fleet_hosts):
    h = fleet_hosts
    plan = fleet.plan(selector=Selector.from_body({"labels": {"env": "prod"}, "exclude_host_ids": [h["prod-b"].id]}))
    assert [p.host.name for p in plan.hosts] == ["old-a", "prod-a", "prod-win"]
    assert {lo.host.name: lo.reason for lo in plan.left_out} == {
        "prod-b": "excluded",
        "prod-current": "already_at_target",
    }
    d = plan.to_dict()
    assert d["selector"] == {"labels": {"env": "prod"}, "exclude_host_ids": [h["prod-b"].id]}
    assert d["hosts"][1]["labels"] == {"env": "prod", "tier": "web"} and not d["explicit"]


def test_a_selector_matching_no_host_is_refused_at_start_saying_so(cast, fleet_hosts):
    with pytest.raises(Refusal) as e:
        fleet.start("admin", selector=Selector.from_body({"labels": {"env": "qa"}}))
    assert (e.value.status, e.value.code) == (422, "no_hosts_to_update")
    assert e.value.message == "no host matches the selector (labels env=qa)"
    with pytest.raises(Refusal) as e:
        # prod-win (the only windows host) is not older than 0.1; prod-current is excluded.
        body = {"labels": {"env": "prod"}, "os": "windows", "older_than": "0.1"}
        body["exclude_host_ids"] = [fleet_hosts["prod-current"].id]
        fleet.start("admin", selector=Selector.from_body(body))
    assert "1 excluded" in e.value.message
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 0


def test_a_started_rollout_stores_its_selector_and_audits_it(cast, fleet_hosts):
    selector = Selector.from_body({"labels": {"tier": "web"}, "os": "linux"})
    fu = fleet.start("admin", selector=selector)
    db.session.expire_all()
    fu = db.session.get(FleetUpdate, fu.id)
    assert [r.host_name for r in fu.hosts] == ["prod-a", "stage-a"]
    assert fu.selector == {"labels": {"tier": "web"}, "os": "linux"} == fu.to_dict()["selector"]
    started = db.session.scalar(sa.select(AuditEvent).where(AuditEvent.action == "fleet.update_started"))
    assert started.details["selector"] == fu.selector


def test_without_a_selector_the_rollout_is_todays_every_behind_host_by_name(cast, fleet_hosts):
    fu = fleet.start("admin")
    assert [r.host_name for r in fu.hosts] == ["app-1", "old-a", "prod-a", "prod-b", "prod-win", "stage-a"]
    assert fu.to_dict()["selector"] == {}


def test_host_ids_and_a_selector_together_are_a_programming_error(cast):
    with pytest.raises(ValueError):
        fleet.plan([cast.host_behind.id], selector=Selector())


def test_label_helpers_parse_the_command_line_forms():
    assert host_labels.parse_pairs(["env=prod", "tier="]) == {"env": "prod", "tier": ""}
    assert host_labels.parse_text("env=prod, tier=web\nzone=eu") == {"env": "prod", "tier": "web", "zone": "eu"}
    assert host_labels.parse_edits(["env=prod", "tier-"]) == ({"env": "prod"}, ["tier"])
    assert host_labels.merged({"env": "prod", "tier": "web"}, {"tier": None, "zone": "eu"}) == {
        "env": "prod",
        "zone": "eu",
    }
    assert host_labels.format_pairs({"b": "2", "a": "1"}) == "a=1 b=2"
    for bad in (["env"], ["=prod"], ["env=prod", "env=dev"]):
        with pytest.raises(Refusal) as e:
            host_labels.parse_pairs(bad)
        assert e.value.code == "invalid_labels"
    with pytest.raises(Refusal):
        host_labels.parse_edits(["env=prod", "env-"])


def test_the_plan_and_update_api_take_the_selector_in_the_body(client, cast, fleet_hosts):
    from app.models import ApiToken

    _, admin = ApiToken.issue(cast.admin, "t")
    db.session.commit()
    headers = {"Authorization": f"Bearer {admin}"}
    body = {"labels": {"env": "prod"}, "arch": "x86_64", "exclude_host_ids": [fleet_hosts["old-a"].id]}
    r = client.post("/api/fleet/plan", json=body, headers=headers)
    assert r.status_code == 200
    plan = r.get_json()["plan"]
    assert [h["name"] for h in plan["hosts"]] == ["prod-a", "prod-win"]
    assert {lo["name"]: lo["reason"] for lo in plan["left_out"]} == {
        "old-a": "excluded",
        "prod-current": "already_at_target",
    }
    r = client.post("/api/fleet/plan", json={"labels": {"env": "pr od"}}, headers=headers)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_labels"
    r = client.post("/api/fleet/update", json={"os": ["linux"]}, headers=headers)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_selector"
    r = client.post("/api/fleet/update", json=body, headers=headers)
    assert r.status_code == 201
    fu = r.get_json()["fleet_update"]
    assert fu["selector"] == body and [h["name"] for h in fu["hosts"]] == ["prod-a", "prod-win"]
    r = client.get(f"/api/fleet-updates/{fu['id']}", headers=headers)
    assert r.get_json()["fleet_update"]["selector"] == body
