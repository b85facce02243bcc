"""Host labels: set at enrolment, through the API (PUT replaces, PATCH merges), on the host page;
shown and filtered on the hosts list. Changes are for admins only and audited ``host.labels_changed``.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import AuditEvent, Host
from tests.web.helpers import bearer, error_code


def _host(host_id) -> Host:
    db.session.expire_all()
    return db.session.get(Host, host_id)


def _changes():
    db.session.expire_all()
    q = sa.select(AuditEvent).where(AuditEvent.action == "host.labels_changed").order_by(AuditEvent.id)
    return [(e.actor, e.target, e.details["old"], e.details["new"]) for e in db.session.scalars(q)]


@pytest.fixture
def labelled(cast):
    cast.host_online.labels = {"env": "prod", "tier": "web"}
    cast.host_behind.labels = {"env": "prod", "tier": "app"}
    cast.host_offline.labels = {"env": "staging"}
    db.session.commit()
    return cast


# --- API ---------------------------------------------------------------------------------------


def test_enrolment_takes_labels_and_the_host_object_carries_them(client, admin_token):
    r = client.post("/api/hosts", json={"name": "edge-1", "labels": {"env": "prod"}}, headers=bearer(admin_token))
    assert r.status_code == 201 and r.get_json()["host"]["labels"] == {"env": "prod"}
    host = _host(r.get_json()["host"]["id"])
    assert host.labels == {"env": "prod"}
    enrolled = db.session.scalar(sa.select(AuditEvent).where(AuditEvent.action == "host.enrolled"))
    assert enrolled.details["labels"] == {"env": "prod"}
    r = client.post("/api/hosts", json={"name": "edge-2"}, headers=bearer(admin_token))
    assert r.get_json()["host"]["labels"] == {}


def test_enrolment_with_bad_labels_is_refused_and_enrols_nothing(client, admin_token):
    r = client.post("/api/hosts", json={"name": "edge-1", "labels": {"env": "a b"}}, headers=bearer(admin_token))
    assert r.status_code == 400 and error_code(r) == "invalid_labels"
    assert "bad value 'a b'" in r.get_json()["error"]["message"]
    assert db.session.scalar(sa.select(Host.id).where(Host.name == "edge-1")) is None


def test_put_replaces_the_labels_and_audits_old_and_new(client, labelled, admin_token):
    url = f"/api/hosts/{labelled.host_online.id}/labels"
    r = client.put(url, json={"labels": {"env": "dev", "k8s.io/zone": "eu-1"}}, headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["host"]["labels"] == {"env": "dev", "k8s.io/zone": "eu-1"}
    assert _host(labelled.host_online.id).labels == {"env": "dev", "k8s.io/zone": "eu-1"}
    [(actor, target, old, new)] = _changes()
    assert actor.startswith("admin (token ") and target == "web-1"
    assert (old, new) == ({"env": "prod", "tier": "web"}, {"env": "dev", "k8s.io/zone": "eu-1"})
    r = client.put(url, json={"labels": {"env": "dev", "k8s.io/zone": "eu-1"}}, headers=bearer(admin_token))
    assert r.status_code == 200 and len(_changes()) == 1  # no change, nothing audited
    r = client.put(url, json={"labels": {}}, headers=bearer(admin_token))
    assert _host(labelled.host_online.id).labels == {} and len(_changes()) == 2


def test_patch_merges_and_null_removes(client, labelled, admin_token):
    url = f"/api/hosts/{labelled.host_online.id}/labels"
    r = client.patch(url, json={"labels": {"tier": None, "zone": "eu"}}, headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["host"]["labels"] == {"env": "prod", "zone": "eu"}
    assert _changes()[-1][2:] == ({"env": "prod", "tier": "web"}, {"env": "prod", "zone": "eu"})
    r = client.patch(url, json={"labels": {"absent": None}}, headers=bearer(admin_token))
    assert r.status_code == 200 and len(_changes()) == 1


@pytest.mark.parametrize(
    "method, body, words",
    [
        ("put", {"labels": ["env=prod"]}, "JSON object"),
        ("put", {}, 'the body must be {"labels"'),
        ("put", {"labels": {"env": None}}, "must be a string"),
        ("put", {"labels": {f"k{i}": "v" for i in range(33)}}, "at most 32"),
        ("patch", {"labels": {f"k{i}": "v" for i in range(31)}}, "at most 32"),  # 2 + 31 = 33
        ("patch", {"labels": {"_x": "1"}}, "bad label key '_x'"),
        ("patch", {"labels": "env=prod"}, "JSON object"),
    ],
)
def test_bad_label_changes_are_refused_and_change_nothing(client, labelled, admin_token, method, body, words):
    url = f"/api/hosts/{labelled.host_online.id}/labels"
    r = getattr(client, method)(url, json=body, headers=bearer(admin_token))
    assert r.status_code == 400 and error_code(r) == "invalid_labels", r.get_json()
    assert words in r.get_json()["error"]["message"]
    assert _host(labelled.host_online.id).labels == {"env": "prod", "tier": "web"} and _changes() == []


def test_label_changes_are_for_admins_and_name_a_missing_host(client, labelled, viewer_token, admin_token):
    url = f"/api/hosts/{labelled.host_online.id}/labels"
    for method in ("put", "patch"):
        r = getattr(client, method)(url, json={"labels": {"env": "x"}}, headers=bearer(viewer_token))
        assert r.status_code == 403
        r = getattr(client, method)("/api/hosts/999999/labels", json={"labels": {}}, headers=bearer(admin_token))
        assert r.status_code == 404 and error_code(r) == "host_not_found"
    r = client.post(url, json={"labels": {}}, headers=bearer(admin_token))
    assert r.status_code == 405
    assert _host(labelled.host_online.id).labels == {"env": "prod", "tier": "web"}


def test_the_host_list_filters_by_labels_all_of_which_must_match(client, labelled, viewer_token):
    def names(query):
        r = client.get(f"/api/hosts{query}", headers=bearer(viewer_token))
        assert r.status_code == 200, r.get_json()
        return [h["name"] for h in r.get_json()["hosts"]]

    assert names("?label=env=prod") == ["app-1", "web-1"]
    assert names("?label=env=prod&label=tier=web") == ["web-1"]
    assert names("?label=env=prod&updates=behind") == ["app-1"]
    assert names("?label=env=qa") == []
    assert names("") == ["app-1", "db-1", "web-1"]
    r = client.get("/api/hosts?label=env", headers=bearer(viewer_token))
    assert r.status_code == 400 and error_code(r) == "invalid_labels"


# --- pages -------------------------------------------------------------------------------------


def test_the_hosts_page_shows_labels_as_filter_links_and_filters_by_them(as_viewer, labelled):
    html = as_viewer.get("/hosts").get_data(as_text=True)
    web = html[html.index('data-host="web-1"') :]
    web = web[: web.index("</tr>")]
    assert 'href="/hosts?label=env%3Dprod"' in web and ">tier=web</a>" in web
    html = as_viewer.get("/hosts?label=env=prod&label=tier=web").get_data(as_text=True)
    assert 'data-host="web-1"' in html and 'data-host="app-1"' not in html and 'data-host="db-1"' not in html
    assert 'id="clear-label-filter"' in html
    html = as_viewer.get("/hosts?label=env=qa").get_data(as_text=True)
    assert "No host carries this label." in html


def test_a_bad_label_filter_on_the_page_says_what_is_wrong(as_viewer, labelled):
    r = as_viewer.get("/hosts?label=env")
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert 'id="label-filter-error"' in html and "write it key=value" in html and 'data-host="' not in html


def test_the_enrol_form_takes_labels_and_refuses_bad_ones_under_the_field(as_admin):
    r = as_admin.post("/hosts/new", data={"name": "edge-1", "labels": "env=prod, tier=web"})
    assert r.status_code == 201
    assert db.session.scalar(sa.select(Host).where(Host.name == "edge-1")).labels == {"env": "prod", "tier": "web"}
    r = as_admin.post("/hosts/new", data={"name": "edge-2", "labels": "env=prod tier"})
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert "bad label &#39;tier&#39;: write it key=value" in html and 'value="env=prod tier"' in html
    assert db.session.scalar(sa.select(Host.id).where(Host.name == "edge-2")) is None


def test_admins_edit_labels_on_the_host_page_and_viewers_only_see_them(client, auth, labelled):
    auth.login("viewer", "viewer-pass-123")
    html = client.get(f"/hosts/{labelled.host_online.id}").get_data(as_text=True)
    assert ">env=prod</a>" in html and 'id="labels-form"' not in html
    r = client.post(f"/hosts/{labelled.host_online.id}/labels", data={"labels": "env=dev"})
    assert r.status_code == 403 and _host(labelled.host_online.id).labels["env"] == "prod"
    auth.logout()
    auth.login("admin", "admin-pass-123")
    html = client.get(f"/hosts/{labelled.host_online.id}").get_data(as_text=True)
    assert 'id="labels-form"' in html and "env=prod tier=web</textarea>" in html
    r = client.post(f"/hosts/{labelled.host_online.id}/labels", data={"labels": "env=dev\nrole=edge"})
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/hosts/{labelled.host_online.id}")
    assert _host(labelled.host_online.id).labels == {"env": "dev", "role": "edge"}
    assert _changes()[-1][0] == "admin"
    assert "Labels of web-1 saved." in client.get(r.headers["Location"]).get_data(as_text=True)


def test_the_host_page_form_refuses_bad_labels_keeping_what_was_typed(as_admin, labelled):
    r = as_admin.post(f"/hosts/{labelled.host_online.id}/labels", data={"labels": "env=prod env=dev"})
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert "label &#39;env&#39; is given twice" in html and "env=prod env=dev</textarea>" in html
    assert _host(labelled.host_online.id).labels == {"env": "prod", "tier": "web"} and _changes() == []
    r = as_admin.post("/hosts/999999/labels", data={"labels": "env=dev"})
    assert r.status_code == 404
