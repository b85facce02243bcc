"""Fleet rolling update: the JSON API and the /settings/fleet-update page.

The rollout's state machine is the update module's (tested there); these tests cover the
endpoints: start, read, list, cancel, their refusals, roles, and the HTMX page.
"""

import re

import pytest

from app.extensions import db
from app.models import FleetUpdate, FleetUpdateHost
from tests.web.helpers import HX, audit_actions, bearer, error_code


def _fleet(fleet_id):
    db.session.expire_all()
    return db.session.get(FleetUpdate, fleet_id)


@pytest.fixture
def started(client, cast, admin_token):
    r = client.post("/api/fleet/update", json={}, headers=bearer(admin_token))
    assert r.status_code == 201
    return r.get_json()["fleet_update"]


# --- API ---------------------------------------------------------------------------------------


def test_the_api_starts_a_rollout_over_every_behind_host(started, cast):
    assert started["status"] == "running" and started["target_version"] == "2.0.0"
    assert [(h["name"], h["status"]) for h in started["hosts"]] == [("app-1", "pending")]
    assert _fleet(started["id"]).status == "running"
    assert "fleet.update_started" in audit_actions()


def test_the_api_rolls_explicit_host_ids_in_the_given_order(client, cast, admin_token):
    ids = [cast.host_online.id, cast.host_behind.id]
    r = client.post("/api/fleet/update", json={"host_ids": ids}, headers=bearer(admin_token))
    assert r.status_code == 201
    rows = db.session.scalars(db.select(FleetUpdateHost).order_by(FleetUpdateHost.position)).all()
    assert [row.host_id for row in rows] == ids


def test_a_second_rollout_is_409_while_one_runs(started, client, admin_token):
    r = client.post("/api/fleet/update", json={}, headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "fleet_update_running"


def test_nothing_behind_is_422(client, cast, admin_token):
    cast.host_behind.agent_version = "2.0.0"
    db.session.commit()
    r = client.post("/api/fleet/update", headers=bearer(admin_token))
    assert r.status_code == 422 and error_code(r) == "no_hosts_to_update"


def test_unknown_host_ids_are_422(client, cast, admin_token):
    r = client.post("/api/fleet/update", json={"host_ids": [cast.host_behind.id, 9999]}, headers=bearer(admin_token))
    assert r.status_code == 422 and error_code(r) == "unknown_host_ids"
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_start_refuses_viewers_bad_json_and_get(client, cast, admin_token, viewer_token):
    r = client.post("/api/fleet/update", json={}, headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"
    r = client.post("/api/fleet/update", data="[", content_type="application/json", headers=bearer(admin_token))
    assert r.status_code == 400 and error_code(r) == "invalid_json"
    assert client.get("/api/fleet/update", headers=bearer(admin_token)).status_code == 405
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_a_rollout_reads_back_by_id_and_in_the_history(started, client, viewer_token):
    got = client.get(f"/api/fleet-updates/{started['id']}", headers=bearer(viewer_token)).get_json()
    assert got["fleet_update"]["id"] == started["id"] and got["fleet_update"]["total"] == 1
    history = client.get("/api/fleet-updates", headers=bearer(viewer_token)).get_json()["fleet_updates"]
    assert [f["id"] for f in history] == [started["id"]]


def test_an_unknown_rollout_is_404(client, cast, admin_token):
    r = client.get("/api/fleet-updates/9999", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "fleet_update_not_found"
    r = client.post("/api/fleet-updates/9999/cancel", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "fleet_update_not_found"


def test_cancel_stops_the_rollout_and_audits(started, client, admin_token):
    r = client.post(f"/api/fleet-updates/{started['id']}/cancel", headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["fleet_update"]["status"] == "cancelled"
    assert _fleet(started["id"]).status == "cancelled"
    assert "fleet.update_cancelled" in audit_actions()
    r = client.post(f"/api/fleet-updates/{started['id']}/cancel", headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "fleet_update_not_running"


def test_cancel_refuses_viewers_and_get(started, client, admin_token, viewer_token):
    assert client.post(f"/api/fleet-updates/{started['id']}/cancel", headers=bearer(viewer_token)).status_code == 403
    assert client.get(f"/api/fleet-updates/{started['id']}/cancel", headers=bearer(admin_token)).status_code == 405
    assert _fleet(started["id"]).status == "running"


# --- page --------------------------------------------------------------------------------------


def test_the_idle_page_shows_how_many_hosts_are_behind_and_a_start_button(as_admin, cast):
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    assert "1 host behind 2.0.0: app-1." in html
    assert 'id="fleet-start"' in html and 'id="fleet-start" disabled' not in html
    assert "No fleet update has run yet." in html


def test_viewers_see_the_page_without_its_controls_and_cannot_start(as_viewer, cast):
    r = as_viewer.get("/settings/fleet-update")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "1 host behind 2.0.0: app-1." in html
    assert 'id="fleet-start"' not in html and "fleet-update/start" not in html
    assert as_viewer.post("/settings/fleet-update/start", headers=HX).status_code == 403
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_viewers_watch_a_running_rollout_without_the_cancel_button(as_viewer, cast):
    from app.updates import fleet

    fu = fleet.start("admin")
    html = as_viewer.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert 'hx-trigger="every 1s"' in html and 'data-host="app-1"' in html
    assert 'id="fleet-cancel"' not in html and "/cancel" not in html
    assert as_viewer.post(f"/settings/fleet-update/{fu.id}/cancel", headers=HX).status_code == 403
    assert _fleet(fu.id).status == "running"


def test_the_start_card_is_its_own_card_beside_the_latest_rollout(as_admin, cast):
    as_admin.post("/settings/fleet-update/start")
    fu = db.session.scalar(db.select(FleetUpdate))
    as_admin.post(f"/settings/fleet-update/{fu.id}/cancel")
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    start_card = html.index('id="fleet-start-card"')
    rollout_card = html.index('id="fleet-rollout"')
    button = html.index('id="fleet-start"')
    assert start_card < button < rollout_card  # the button is in the start card, not the old rollout's


def test_history_times_read_to_the_second(as_admin, cast):
    as_admin.post("/settings/fleet-update/start")
    fu = db.session.scalar(db.select(FleetUpdate))
    as_admin.post(f"/settings/fleet-update/{fu.id}/cancel")
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    history = html[html.index('id="fleet-history"') :]
    assert fu.created_at.strftime("%Y-%m-%d %H:%M:%S UTC") in history
    assert not re.search(r"\d\d:\d\d:\d\d\.\d", history)  # no microseconds


def test_a_host_waiting_out_the_offline_grace_says_so_with_the_time_left(as_admin, app, cast, clock):
    from app.updates import fleet

    app.config["FLEET_OFFLINE_GRACE_S"] = 120
    cast.host_offline.agent_version = "1.0.0"  # db-1: behind and offline
    db.session.commit()
    fleet.start("admin", host_ids=[cast.host_offline.id])
    clock.advance(30)
    assert fleet.tick() is False  # waits
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    row = html[html.index('data-host="db-1"') :]
    assert "waiting · 90 s" in row[: row.index("</tr>")]
    assert "Waiting for db-1 to come back online" in html and "halts there in 90 s" in html


def test_the_htmx_start_button_starts_a_rollout_and_redirects(as_admin, cast):
    r = as_admin.post("/settings/fleet-update/start", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/settings/fleet-update"
    [fu] = db.session.scalars(db.select(FleetUpdate)).all()
    assert fu.status == "running" and fu.created_by == "admin"


def test_a_plain_form_start_answers_303(as_admin, cast):
    r = as_admin.post("/settings/fleet-update/start")
    assert r.status_code == 303 and r.headers["Location"] == "/settings/fleet-update"


def test_a_running_rollout_polls_and_offers_cancel(as_admin, cast):
    as_admin.post("/settings/fleet-update/start")
    r = as_admin.get("/settings/fleet-update/status", headers=HX)
    html = r.get_data(as_text=True)
    assert "<html" not in html and 'hx-trigger="every 1s"' in html
    assert 'id="fleet-cancel"' in html and 'data-host="app-1"' in html and "<progress" in html
    assert 'id="fleet-history" hx-swap-oob="true"' in html


def test_starting_with_nothing_behind_answers_the_partial_with_422(as_admin, cast):
    cast.host_behind.agent_version = "2.0.0"
    db.session.commit()
    r = as_admin.post("/settings/fleet-update/start", headers=HX)
    assert r.status_code == 422 and b"no host is behind" in r.data and b'id="fleet-status"' in r.data


def test_cancel_from_the_page_stops_the_rollout_and_polling(as_admin, cast):
    as_admin.post("/settings/fleet-update/start")
    fu = db.session.scalar(db.select(FleetUpdate))
    r = as_admin.post(f"/settings/fleet-update/{fu.id}/cancel", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/settings/fleet-update"
    assert _fleet(fu.id).status == "cancelled"
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert "hx-trigger" not in html and 'data-fleet-status="cancelled"' in html


def test_cancel_of_a_missing_rollout_is_404_and_get_is_405(as_admin, cast):
    assert as_admin.post("/settings/fleet-update/9999/cancel").status_code == 404
    assert as_admin.get("/settings/fleet-update/1/cancel").status_code == 405


def test_the_idle_page_names_behind_hosts_a_start_would_leave_out(as_admin, cast):
    from app.models import Host

    host, _ = Host.enrol("app-9")
    host.agent_version, host.connected, host.capabilities = "1.0.0", True, []
    db.session.commit()
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    assert "1 host behind 2.0.0: app-1." in html
    assert "Left out (behind, but not updatable now):" in html and "app-9 (cannot update)" in html


def test_the_rollout_page_says_what_the_rollout_selected(client, as_admin, cast, admin_token):
    cast.host_behind.labels = {"env": "prod"}
    db.session.commit()
    body = {"labels": {"env": "prod"}, "os": "linux", "exclude_host_ids": [cast.host_offline.id]}
    r = client.post("/api/fleet/update", json=body, headers=bearer(admin_token))
    assert r.status_code == 201 and r.get_json()["fleet_update"]["selector"] == body
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    assert "Selected: labels env=prod, os linux, excluding 1 host(s)" in html


def test_a_rollout_without_a_selector_says_every_host(as_admin, started):
    assert "Selected: every host" in as_admin.get("/settings/fleet-update").get_data(as_text=True)


# --- strategy, plan, controls ------------------------------------------------------------------


def _more_behind(n):
    from app.models import Host

    made = []
    for i in range(1, n + 1):
        host, _ = Host.enrol(f"b-{i}")
        host.agent_version, host.capabilities, host.connected = "1.0.0", ["update"], True
        made.append(host)
    db.session.commit()
    return made


def test_the_idle_page_shows_the_default_plan_with_its_confirm_button(as_admin, cast):
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    plan = html[html.index('id="fleet-plan"') :]
    assert "Plan: 1 host in 1 wave" in plan and 'data-host="app-1"' in plan
    assert "one host at a time, halt at the first failure, offline hosts: halt" in plan
    assert 'id="fleet-strategy-form"' in html and 'hx-confirm="Start updating 1 agent(s)' in plan


def test_previewing_a_strategy_answers_the_plan_fragment_with_waves(as_admin, cast):
    _more_behind(4)
    form = {"canary": "1", "canary_soak_s": "30", "max_in_flight": "2", "max_failures": "20%", "offline": "skip"}
    r = as_admin.post("/settings/fleet-update/plan", data=form, headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "<html" not in html and 'data-waves="3"' in html
    assert "canary 1 (soak 30 s), 2 at a time, tolerate 1 failure(s), halt at the next, offline hosts: skip" in html
    assert 'name="max_in_flight" value="2"' in html and 'name="max_failures" value="20%"' in html  # carried to Start
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0  # a plan changes nothing


def test_a_bad_strategy_in_the_form_says_which_field_and_cannot_be_started(as_admin, cast):
    r = as_admin.post("/settings/fleet-update/plan", data={"max_in_flight": "lots"}, headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 400 and "max_in_flight: &#39;lots&#39;" in html
    assert 'id="fleet-start" disabled' in html
    r = as_admin.post("/settings/fleet-update/start", data={"max_in_flight": "lots"}, headers=HX)
    assert r.status_code == 400 and b"max_in_flight" in r.data
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_starting_from_the_form_stores_the_strategy(as_admin, cast):
    _more_behind(2)
    r = as_admin.post("/settings/fleet-update/start", data={"max_in_flight": "2", "max_failures": "1"}, headers=HX)
    assert r.status_code == 204
    fu = db.session.scalar(db.select(FleetUpdate))
    assert (fu.max_in_flight, fu.max_failures, fu.offline) == ("2", "1", "halt")
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert "Strategy: 2 at a time, tolerate 1 failure(s)" in html


def test_pause_resume_skip_and_retry_from_the_page(as_admin, cast):
    as_admin.post("/settings/fleet-update/start")
    fu = db.session.scalar(db.select(FleetUpdate))
    assert as_admin.post(f"/settings/fleet-update/{fu.id}/pause", headers=HX).status_code == 204
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert 'id="fleet-resume"' in html and 'id="fleet-paused"' in html and "Paused by admin" in html
    r = as_admin.post(f"/settings/fleet-update/{fu.id}/pause", headers=HX)
    assert r.status_code == 409 and b"already paused" in r.data
    assert as_admin.post(f"/settings/fleet-update/{fu.id}/resume", headers=HX).status_code == 204
    assert 'data-skip="app-1"' in as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    r = as_admin.post(f"/settings/fleet-update/{fu.id}/hosts/{cast.host_behind.id}/skip", headers=HX)
    assert r.status_code == 204 and _fleet(fu.id).hosts[0].status == "skipped"
    as_admin.post(f"/settings/fleet-update/{fu.id}/cancel", headers=HX)
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert 'id="fleet-retry"' in html
    assert as_admin.post(f"/settings/fleet-update/{fu.id}/retry", headers=HX).status_code == 204
    retry = db.session.scalar(db.select(FleetUpdate).where(FleetUpdate.parent_id == fu.id))
    assert retry.kind == "retry" and [h.host_name for h in retry.hosts] == ["app-1"]
    assert as_admin.post("/settings/fleet-update/9999/pause").status_code == 404


# --- the "Select hosts" fieldset and revert_on_halt ----------------------------------------------


def _labelled_fleet():
    """b-1 (env=prod, linux), b-2 (env=prod, linux), b-3 (env=dev, linux), b-4 (env=prod, windows)."""
    b1, b2, b3, b4 = _more_behind(4)
    for host, env, os_name in (
        (b1, "prod", "linux"),
        (b2, "prod", "linux"),
        (b3, "dev", "linux"),
        (b4, "prod", "windows"),
    ):
        host.labels, host.os, host.arch = {"env": env}, os_name, "x86_64"
    db.session.commit()
    return b1, b2, b3, b4


def _plan_of(html):
    plan = html[html.index('id="fleet-plan"') :]
    taken = re.findall(r'class="plan-host" data-host="([^"]+)"', plan)
    left_out = dict(
        re.findall(
            r'<li data-host="([^"]+)"><strong>[^<]+</strong> <span class="chip chip-left-out">([^<]+)</span>', plan
        )
    )
    return taken, left_out


def test_the_plan_takes_only_the_selected_hosts_and_names_the_excluded_ones(as_admin, cast):
    _labelled_fleet()
    form = {"labels": "env=prod", "os": "linux", "arch": "x86_64", "exclude_hosts": "b-2"}
    r = as_admin.post("/settings/fleet-update/plan", data=form, headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    taken, left_out = _plan_of(html)
    assert taken == ["b-1"]  # b-2 excluded, b-3 is dev, b-4 windows, app-1 has no labels
    assert left_out.get("b-2") == "excluded"
    # The Start button carries the same fields, as typed.
    start = html[html.index('action="/settings/fleet-update/start"') :]
    for name, value in form.items():
        assert f'name="{name}" value="{value}"' in start
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_older_than_narrows_the_plan(as_admin, cast):
    b1, b2, _, _ = _labelled_fleet()
    b1.agent_version = "0.9.0"
    db.session.commit()
    html = as_admin.post("/settings/fleet-update/plan", data={"older_than": "1.0.0"}, headers=HX).get_data(as_text=True)
    assert _plan_of(html)[0] == ["b-1"]


def test_starting_from_the_form_stores_the_selector_and_revert_on_halt(as_admin, cast):
    b1, b2, _, _ = _labelled_fleet()
    form = {"labels": "env=prod, team=ops", "exclude_hosts": "b-2", "revert_on_halt": "1"}
    r = as_admin.post("/settings/fleet-update/plan", data=form, headers=HX)
    assert r.status_code == 200 and _plan_of(r.get_data(as_text=True))[0] == []  # nobody has team=ops
    b1.labels = {"env": "prod", "team": "ops"}
    b2.labels = {"env": "prod", "team": "ops"}
    db.session.commit()
    html = as_admin.post("/settings/fleet-update/plan", data=form, headers=HX).get_data(as_text=True)
    assert _plan_of(html) == (["b-1"], {"b-2": "excluded"})
    assert "if it halts, the updated hosts are reverted" in html
    r = as_admin.post("/settings/fleet-update/start", data=form, headers=HX)
    assert r.status_code == 204
    fu = db.session.scalar(db.select(FleetUpdate))
    assert fu.selector == {"labels": {"env": "prod", "team": "ops"}, "exclude_host_ids": [b2.id]}
    assert fu.revert_on_halt is True and [h.host_name for h in fu.hosts] == ["b-1"]
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert 'id="fleet-revert-on-halt"' in html


def test_a_plain_start_does_not_revert_on_halt(as_admin, cast):
    assert as_admin.post("/settings/fleet-update/start", headers=HX).status_code == 204
    assert db.session.scalar(db.select(FleetUpdate)).revert_on_halt is False


@pytest.mark.parametrize(
    "form, status, says",
    [
        ({"labels": "env prod"}, 400, "bad label &#39;env&#39;: write it key=value"),
        ({"os": "linux mint"}, 400, "os must be 1 to 64"),
        ({"older_than": "new"}, 400, "older_than must be a version"),
        ({"exclude_hosts": "b-1, nosuch"}, 422, "no host is named nosuch"),
    ],
)
def test_bad_selector_input_is_a_form_message_and_starts_nothing(as_admin, cast, form, status, says):
    _more_behind(1)
    r = as_admin.post("/settings/fleet-update/plan", data={**form, "max_in_flight": "2"}, headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == status and 'id="fleet-plan-error"' in html and says in html
    assert 'id="fleet-start" disabled' in html
    r = as_admin.post("/settings/fleet-update/start", data=form, headers=HX)
    assert r.status_code == status and says in r.get_data(as_text=True)
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_the_form_keeps_what_was_typed_after_a_message(as_admin, cast):
    form = {"labels": "env prod", "exclude_hosts": "x, y", "max_in_flight": "3", "revert_on_halt": "1"}
    html = as_admin.post("/settings/fleet-update/plan", data=form).get_data(as_text=True)
    assert 'name="labels" value="env prod"' in html and 'name="exclude_hosts" value="x, y"' in html
    assert 'name="max_in_flight" value="3"' in html and 'name="revert_on_halt" value="1" checked' in html
