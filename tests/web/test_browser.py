"""The pages in a real browser: headless Chromium (Debian's package) driven by Playwright.

A real server (waitress admin plane + werkzeug agent plane, in this process, on ephemeral ports)
and a real agent process connected to it; the browser logs in, finds the host online, opens its
page, and revokes its token through the HTMX form (confirm dialog, CSRF header, HX-Redirect).
"""

from __future__ import annotations

import contextlib
import os

import pytest

from app.extensions import db
from app.models import Host, Job
from app.updates import releases
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.live import AgentProcess, LiveServer, built_agent
from tests.support.wait import wait_until

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]


def _host_online(host_id: int) -> bool:
    db.session.expire_all()
    host = db.session.get(Host, host_id)
    return bool(host and host.connected)


@contextlib.contextmanager
def _live_demo(app, tmp_path_factory, tmp_path, scheduler: bool):
    """A live server offering the server's version, with one real agent at an older version as demo-1."""
    host, token = Host.enrol("demo-1")
    db.session.commit()
    app.config.update(HEARTBEAT_S=0.5, HEARTBEAT_TIMEOUT=5.0, BUILD_AGENT_ON_START=False, FLEET_TICK_S=0.5)
    builds = str(tmp_path_factory.getbasetemp() / "agent-builds")
    program = built_agent(OLD_VERSION, builds)
    releases.register(built_agent(SERVER_VERSION, builds), SERVER_VERSION)
    with LiveServer(app, scheduler=scheduler) as server:
        agent = AgentProcess(str(tmp_path / "agent"), program, server.agent_ws_url, token).start()
        try:
            wait_until(lambda: _host_online(host.id), timeout=20, what="the demo agent to come online")
            yield server, host.id
        finally:
            agent.stop()


@pytest.fixture
def live_demo(app, cast, tmp_path_factory, tmp_path):
    with _live_demo(app, tmp_path_factory, tmp_path, scheduler=False) as live:
        yield live


@pytest.fixture
def live_demo_scheduled(app, cast, tmp_path_factory, tmp_path):
    """The same, with the background scheduler running (fleet ticks, timeout sweeps)."""
    with _live_demo(app, tmp_path_factory, tmp_path, scheduler=True) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module (launching it takes a second); each test opens its own page,
    and ``new_page`` gives every page a fresh context (no cookies shared between tests)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def test_an_admin_logs_in_sees_the_host_online_and_revokes_it_from_its_page(live_demo, browser, tmp_path):
    server, host_id = live_demo
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.set_default_timeout(10_000)

    page.goto(server.admin_url + "/hosts")
    assert "/login" in page.url  # anonymous users are sent to log in
    page.fill("#username", "admin")
    page.fill("#password", "admin-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(server.admin_url + "/hosts")

    row = page.locator('tr[data-host="demo-1"]')
    assert row.locator(".chip-online").inner_text() == "online"
    assert "behind" in row.locator(".chip-behind").inner_text()
    page.screenshot(path=str(tmp_path / "hosts.png"), full_page=True)

    row.locator("a").click()
    page.wait_for_url(f"{server.admin_url}/hosts/{host_id}")
    assert page.locator("h1").inner_text().startswith("demo-1")
    assert page.locator("#update-button").is_enabled()
    assert page.locator("footer").inner_text().endswith(server.app.config["SERVER_VERSION"])
    assert page.evaluate("typeof window.htmx") == "object"  # loaded from /static under the CSP
    page.screenshot(path=str(tmp_path / "host.png"), full_page=True)

    # The HTMX form: hx-confirm dialog, X-CSRFToken from hx-headers, HX-Redirect back to the page.
    page.once("dialog", lambda d: d.accept())
    page.click("text=Revoke agent token")
    page.wait_for_selector(".chip-revoked")
    assert "revoked" in page.locator(".flash-info").inner_text()
    wait_until(lambda: not _host_online(host_id), timeout=10, what="the revoked agent to be dropped")
    page.screenshot(path=str(tmp_path / "revoked.png"), full_page=True)

    assert problems == [], problems  # no CSP violations, no script errors


def _login(page, base_url: str) -> None:
    page.goto(base_url + "/login")
    page.fill("#username", "admin")
    page.fill("#password", "admin-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(base_url + "/")


def test_an_admin_presses_update_and_watches_the_job_finish_live(live_demo, browser, tmp_path):
    server, host_id = live_demo
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(20_000)
    _login(page, server.admin_url)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    page.click("#tile-behind")  # the dashboard tile leads to the filtered list
    page.wait_for_url(server.admin_url + "/hosts?updates=behind")
    page.click('tr[data-host="demo-1"] a')
    page.click("#update-button")  # hx-post; the answer is the polling panel with the "dispatched" message
    page.wait_for_selector("#update-status .flash-info")
    assert "already running" not in page.locator("#update-status").inner_text()
    # The panel polls every second; it turns terminal when the agent says hello at the new version.
    page.wait_for_selector('#update-status[data-job-status="succeeded"]')
    panel = page.locator("#update-status").inner_text()
    assert f"Agent came back at {SERVER_VERSION}" in panel
    assert page.locator("#update-status").get_attribute("hx-trigger") is None  # polling stopped
    assert "succeeded" in page.locator("#job-history").inner_text()  # history swapped out of band
    assert f"{SERVER_VERSION} · current" in page.locator("#host-status").inner_text()
    assert "dispatched" not in page.locator("main").inner_text()  # the banner went with the first poll
    page.screenshot(path=str(tmp_path / "updated.png"), full_page=True)

    db.session.expire_all()
    [job] = db.session.scalars(db.select(Job).where(Job.host_id == host_id)).all()
    assert job.status == "succeeded" and db.session.get(Host, host_id).agent_version == SERVER_VERSION
    assert problems == [], problems


def test_an_admin_starts_a_fleet_update_and_watches_it_finish(live_demo_scheduled, browser, tmp_path, cast):
    server, host_id = live_demo_scheduled
    cast.host_behind.agent_version = SERVER_VERSION  # the cast's offline app-1 would halt the rollout
    db.session.commit()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(30_000)
    _login(page, server.admin_url)

    page.click("text=Fleet update")
    page.wait_for_url(server.admin_url + "/settings/fleet-update")
    assert "1 host behind" in page.locator("#fleet-status").inner_text()
    page.once("dialog", lambda d: d.accept())
    page.click("#fleet-start")
    page.wait_for_selector('#fleet-status[data-fleet-status="succeeded"]')
    assert page.locator('#fleet-status tr[data-host="demo-1"] .chip-row-succeeded').count() == 1
    assert "1 / 1 done" in page.locator("#fleet-status").inner_text()
    assert "succeeded" in page.locator("#fleet-history").inner_text()
    page.screenshot(path=str(tmp_path / "fleet.png"), full_page=True)

    db.session.expire_all()
    assert db.session.get(Host, host_id).agent_version == SERVER_VERSION
    assert problems == [], problems


def test_an_admin_plans_a_canary_rollout_confirms_it_pauses_resumes_and_watches_it_finish(
    app, cast, browser, tmp_path, tmp_path_factory
):
    """Plan → confirm → wave progress → pause → resume → finish, over three real agents."""
    from app.models import FleetUpdate
    from app.runtime import runtime
    from app.timeutil import utcnow

    cast.host_behind.agent_version = SERVER_VERSION  # the cast's agentless app-1 is not part of this
    made = [Host.enrol(f"wave-{i}") for i in (1, 2, 3)]
    db.session.commit()
    app.config.update(HEARTBEAT_S=0.5, HEARTBEAT_TIMEOUT=5.0, BUILD_AGENT_ON_START=False, FLEET_TICK_S=0.2)
    builds = str(tmp_path_factory.getbasetemp() / "agent-builds")
    program = built_agent(OLD_VERSION, builds)
    releases.register(built_agent(SERVER_VERSION, builds), SERVER_VERSION)
    with LiveServer(app, scheduler=True) as server:
        agents = [
            AgentProcess(str(tmp_path / f"agent{i}"), program, server.agent_ws_url, token).start()
            for i, (_, token) in enumerate(made)
        ]
        try:
            wait_until(lambda: all(_host_online(h.id) for h, _ in made), timeout=30, what="the agents online")
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.set_default_timeout(30_000)
            _login(page, server.admin_url)
            page.goto(server.admin_url + "/settings/fleet-update")

            # Plan: a canary, then waves of two, with a soak after the canary.
            page.fill('#fleet-strategy-form input[name="canary"]', "1")
            page.fill('#fleet-strategy-form input[name="canary_soak_s"]', "4")
            page.fill('#fleet-strategy-form input[name="max_in_flight"]', "2")
            page.click("#fleet-preview")
            page.wait_for_selector('#fleet-plan[data-waves="2"]')
            plan = page.locator("#fleet-plan")
            assert "Plan: 3 hosts in 2 waves" in plan.inner_text()
            assert "canary 1 (soak 4 s), 2 at a time" in plan.inner_text()
            assert plan.locator('tr[data-wave="0"] [data-host="wave-1"]').count() == 1
            assert plan.locator('tr[data-wave="1"] [data-host="wave-3"]').count() == 1
            page.screenshot(path=str(tmp_path / "plan.png"), full_page=True)

            # Confirm: the dialog names what starts.
            dialogs: list[str] = []
            page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
            page.click("#fleet-start")
            page.wait_for_selector('#fleet-status[data-fleet-status="running"]')
            assert "3 agent(s)" in dialogs[0] and "2 wave(s)" in dialogs[0]

            # Wave progress: the canary succeeds; the rollout soaks before wave 1. Pause now.
            page.wait_for_selector('#fleet-status tr[data-host="wave-1"] .chip-row-succeeded')
            page.click("#fleet-pause")
            page.wait_for_selector("#fleet-paused")
            assert page.locator("#fleet-resume").is_visible()
            db.session.expire_all()
            fu = db.session.scalar(db.select(FleetUpdate).where(FleetUpdate.status == "running"))
            assert fu.paused_by == "admin" and fu.canary == 1 and fu.max_in_flight == "2"
            assert fu.hold_until is not None  # soaking after the canary
            runtime(app).clock.advance(5)  # the test's clock: the soak is over
            assert utcnow() > fu.hold_until
            page.wait_for_timeout(600)  # a few ticks of the paused rollout
            for name in ("wave-2", "wave-3"):
                assert page.locator(f'#fleet-status tr[data-host="{name}"] .chip-row-pending').count() == 1
            page.screenshot(path=str(tmp_path / "paused.png"), full_page=True)

            page.click("#fleet-resume")
            page.wait_for_selector('#fleet-status[data-fleet-status="succeeded"]', timeout=60_000)
            for name in ("wave-1", "wave-2", "wave-3"):
                assert page.locator(f'#fleet-status tr[data-host="{name}"] .chip-row-succeeded').count() == 1
            assert "3 / 3 done" in page.locator("#fleet-status").inner_text()
            page.screenshot(path=str(tmp_path / "finished.png"), full_page=True)
            assert problems == [], problems
        finally:
            for agent in agents:
                agent.stop()
    db.session.expire_all()
    assert [db.session.get(Host, h.id).agent_version for h, _ in made] == [SERVER_VERSION] * 3


def test_an_admin_selects_hosts_by_label_excludes_one_and_asks_for_a_revert_on_a_phone(app, cast, browser, tmp_path):
    """The "Select hosts" fieldset on a 390 px screen: the plan follows it, Start carries it."""
    from app.models import FleetUpdate

    cast.host_behind.agent_version = SERVER_VERSION  # only the labelled hosts below are behind
    made = {}
    for name, env in (("sel-1", "prod"), ("sel-2", "prod"), ("sel-3", "dev")):
        host, _ = Host.enrol(name)
        host.agent_version, host.capabilities = OLD_VERSION, ["update"]
        host.labels, host.os, host.arch = {"env": env}, "linux", "x86_64"
        made[name] = host
    db.session.commit()
    with LiveServer(app, scheduler=False) as server:
        page = browser.new_page(viewport={"width": 390, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.set_default_timeout(15_000)
        _login(page, server.admin_url)
        page.goto(server.admin_url + "/settings/fleet-update")

        # A bad label is a message in place; nothing can start.
        page.fill('#fleet-select-hosts input[name="labels"]', "env prod")
        page.click("#fleet-preview")
        page.wait_for_selector("#fleet-plan-error")
        assert "write it key=value" in page.locator("#fleet-plan-error").inner_text()
        assert page.locator("#fleet-start").is_disabled()

        page.fill('#fleet-select-hosts input[name="labels"]', "env=prod")
        page.fill('#fleet-select-hosts input[name="exclude_hosts"]', "sel-2")
        page.check('#fleet-strategy-form input[name="revert_on_halt"]')
        page.select_option('#fleet-strategy-form select[name="offline"]', "wait")  # no agents: all offline
        page.click("#fleet-preview")
        page.wait_for_selector('#fleet-plan[data-hosts="1"]:not(:has(#fleet-plan-error))')
        plan = page.locator("#fleet-plan")
        assert plan.locator('.plan-host[data-host="sel-1"]').count() == 1
        assert "excluded" in plan.locator('#fleet-plan-left-out li[data-host="sel-2"]').inner_text()
        assert plan.locator('[data-host="sel-3"]').count() == 0
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        page.screenshot(path=str(tmp_path / "select-hosts.png"), full_page=True)

        dialogs: list[str] = []
        page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        page.click("#fleet-start")
        page.wait_for_selector('#fleet-status[data-fleet-status="running"]')
        assert "1 agent(s)" in dialogs[0] and "the updated hosts are reverted" in dialogs[0]
        assert "reverts the updated hosts if it halts" in page.locator("#fleet-selector").inner_text()
        # The bad label's 400 is logged by the browser and by htmx; nothing else may be.
        assert [p for p in problems if "400" not in p] == [], problems
    db.session.expire_all()
    fu = db.session.scalar(db.select(FleetUpdate))
    assert fu.selector == {"labels": {"env": "prod"}, "exclude_host_ids": [made["sel-2"].id]}
    assert fu.revert_on_halt is True and [h.host_name for h in fu.hosts] == ["sel-1"]
