"""Read-only pages: dashboard, hosts list, host detail, alerts, audit."""

import re

from app.extensions import db
from app.models import Alert, AuditEvent, Job
from app.updates import fleet
from tests.conftest import OLD_VERSION, SERVER_VERSION, Cast
from tests.web.helpers import HX


def test_the_dashboard_counts_hosts_alerts_and_behind_agents(as_admin, cast):
    Alert.raise_or_touch("update_failed", str(cast.host_behind.id), "app-1 failed", cast.host_behind.id)
    db.session.commit()
    html = as_admin.get("/").get_data(as_text=True)
    assert '2<span class="of"> / 3</span>' in html  # online / total
    assert 'href="/hosts?updates=behind"' in html
    assert "1</span>\n    <span>agent behind" in html
    assert "app-1 failed" in html


def test_the_footer_shows_the_server_version(as_viewer):
    assert f"restic-manager server {SERVER_VERSION}" in as_viewer.get("/").get_data(as_text=True)


def test_the_hosts_list_shows_status_version_chips_and_platform(as_viewer, cast):
    html = as_viewer.get("/hosts").get_data(as_text=True)
    for name in ("web-1", "db-1", "app-1"):
        assert f'data-host="{name}"' in html
    assert "chip-online" in html and "chip-offline" in html
    assert "chip-current" in html and "chip-behind" in html
    assert "linux / x86_64" in html


def test_the_hosts_list_filters_behind_agents(as_viewer, cast):
    html = as_viewer.get("/hosts?updates=behind").get_data(as_text=True)
    assert 'data-host="app-1"' in html
    assert 'data-host="web-1"' not in html and 'data-host="db-1"' not in html


def test_behind_means_one_thing_to_the_dashboard_the_filters_and_a_rollout(as_admin, cast):
    """A revoked host on an old agent can never be updated: no count, filter or rollout takes it."""
    revoked, _ = Cast._host("old-revoked", OLD_VERSION, False)
    revoked.revoke()
    db.session.commit()

    dashboard = as_admin.get("/").get_data(as_text=True)
    assert "1</span>\n    <span>agent behind" in dashboard
    page = as_admin.get("/hosts?updates=behind").get_data(as_text=True)
    assert 'data-host="app-1"' in page and 'data-host="old-revoked"' not in page
    api = as_admin.get("/api/hosts?updates=behind").get_json()["hosts"]
    assert [h["name"] for h in api] == ["app-1"]
    fleet_page = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    # The plan takes app-1 and names the revoked host only among those it leaves out, and why.
    assert 'class="plan-host" data-host="app-1"' in fleet_page
    assert 'class="plan-host" data-host="old-revoked"' not in fleet_page
    assert re.search(r'<li data-host="old-revoked">.*?chip-left-out">revoked<', fleet_page)
    rollout = fleet.start("admin")
    assert [row.host.name for row in rollout.hosts] == ["app-1"]
    # ... while the full list still shows the revoked host and its version state.
    assert 'data-host="old-revoked"' in as_admin.get("/hosts").get_data(as_text=True)


def test_the_hosts_list_rejects_an_unknown_filter(as_viewer):
    assert as_viewer.get("/hosts?updates=sideways").status_code == 400


def test_viewers_see_no_admin_controls(as_viewer, cast):
    assert b"Add host" not in as_viewer.get("/hosts").data
    html = as_viewer.get(f"/hosts/{cast.host_behind.id}").get_data(as_text=True)
    assert "Update agent" not in html and "Revoke agent token" not in html and "Delete host" not in html
    assert "API tokens" not in html


def test_admins_see_the_controls(as_admin, cast):
    html = as_admin.get(f"/hosts/{cast.host_behind.id}").get_data(as_text=True)
    assert "Update agent to 2.0.0" in html and "Revoke agent token" in html and "Delete host" in html


def test_the_host_page_shows_status_versions_and_capabilities(as_viewer, cast):
    html = as_viewer.get(f"/hosts/{cast.host_behind.id}").get_data(as_text=True)
    assert "app-1" in html and "chip-online" in html and "1.0.0 · behind" in html
    assert '<span class="chip chip-cap">update</span>' in html


def test_an_unknown_host_page_is_404(as_viewer):
    r = as_viewer.get("/hosts/9999")
    assert r.status_code == 404 and b"no host with id 9999" in r.data.lower()


def test_the_update_status_partial_polls_while_a_job_runs(as_viewer, cast):
    job = Job(
        host_id=cast.host_behind.id,
        kind="update",
        status="running",
        phase="downloading",
        bytes_done=50,
        bytes_total=100,
        params={"version": "2.0.0", "from_version": "1.0.0"},
    )
    db.session.add(job)
    db.session.commit()
    r = as_viewer.get(f"/hosts/{cast.host_behind.id}/update-status", headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "<html" not in html
    assert 'hx-trigger="every 1s"' in html and "downloading" in html and "<progress" in html
    assert 'id="job-history" hx-swap-oob="true"' in html and 'id="host-status" hx-swap-oob="true"' in html


def test_the_update_status_partial_stops_polling_when_the_job_is_terminal(as_viewer, cast):
    db.session.add(
        Job(
            host_id=cast.host_behind.id,
            kind="update",
            status="failed",
            error="timed out after 90 s",
            params={"version": "2.0.0", "from_version": "1.0.0"},
        )
    )
    db.session.commit()
    html = as_viewer.get(f"/hosts/{cast.host_behind.id}/update-status", headers=HX).get_data(as_text=True)
    assert "hx-trigger" not in html and "timed out after 90 s" in html


def test_the_update_status_without_htmx_is_the_full_page(as_viewer, cast):
    html = as_viewer.get(f"/hosts/{cast.host_behind.id}/update-status").get_data(as_text=True)
    assert "<html" in html


def test_the_host_page_lists_the_job_history(as_viewer, cast):
    for status in ("failed", "succeeded"):
        db.session.add(
            Job(
                host_id=cast.host_online.id,
                kind="update",
                status=status,
                params={"version": "2.0.0", "from_version": "1.0.0"},
                actor="admin",
            )
        )
    db.session.commit()
    html = as_viewer.get(f"/hosts/{cast.host_online.id}").get_data(as_text=True)
    assert html.count("chip-job-") >= 3  # two rows plus the latest-update summary


def test_the_alerts_page_shows_open_and_resolved_alerts(as_viewer, cast):
    Alert.raise_or_touch("update_failed", "1", "web-1 broke", cast.host_online.id)
    Alert.raise_or_touch("update_failed", "3", "app-1 broke", cast.host_behind.id)
    db.session.commit()
    Alert.resolve("update_failed", "3")
    db.session.commit()
    html = as_viewer.get("/alerts").get_data(as_text=True)
    open_part, resolved_part = html.split("Recently resolved")
    assert "web-1 broke" in open_part and "app-1 broke" in resolved_part


def test_the_audit_page_is_newest_first_and_paginated(as_viewer, cast):
    for i in range(60):
        AuditEvent.record("tester", "test.event", f"target-{i}")
    db.session.commit()
    html = as_viewer.get("/audit").get_data(as_text=True)
    assert html.index("target-59") < html.index("target-58")
    assert "target-9<" not in html and "Older" in html
    older = html.split('href="/audit?before_id=')[1].split('"')[0]
    html2 = as_viewer.get(f"/audit?before_id={older}").get_data(as_text=True)
    assert "target-9<" in html2 and "target-59<" not in html2


def test_audit_details_read_as_text_not_python_reprs(as_viewer, cast):
    AuditEvent.record(
        "admin", "fleet.update_started", "fleet_update:1", target_version="2.0.0", hosts=["web-1", "web-2"], dry=False
    )
    db.session.commit()
    html = as_viewer.get("/audit").get_data(as_text=True)
    cell = html[html.index('<td class="details">') :]
    cell = cell[: cell.index("</td>")]
    assert '<span class="muted">hosts:</span> web-1, web-2' in cell
    assert '<span class="muted">target_version:</span> 2.0.0' in cell and "dry:</span> no" in cell
    text = re.sub(r"<[^>]+>", "", cell.split(">", 1)[1])
    assert text == "target_version: 2.0.0 hosts: web-1, web-2 dry: no"


def test_the_details_filter_joins_lists_and_names_empty_values():
    from app.main.filters import audit_details

    assert audit_details({"hosts": ["a", "b"], "n": 3, "x": None, "ok": True, "m": {"k": [1]}, "e": []}) == [
        ("hosts", "a, b"),
        ("n", "3"),
        ("x", "—"),
        ("ok", "yes"),
        ("m", "k 1"),
        ("e", "none"),
    ]
    assert audit_details(None) == []
