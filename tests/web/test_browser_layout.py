"""Every page in Chromium at a desktop (1280 px) and a phone (390 px) width.

A real server with a lived-in database (long host names, a long audit trail, alerts, a halted
rollout in the history, a running update and a rollout waiting for an offline host, so the host
and fleet pages poll). For each page: it is no wider than the window
(``document.documentElement.scrollWidth <= innerWidth``), everything in the top bar stays inside
the bar (on the phone the links fold behind "Menu" and open inside it), and no CSP violation or
script error is logged while the polling pages poll. Screenshots of every page land in the
test's tmp dir.
"""

from __future__ import annotations

import datetime as dt

import pytest

from app.extensions import db
from app.models import Alert, ApiToken, AuditEvent, FleetUpdate, FleetUpdateHost, Host, Job
from app.timeutil import utcnow
from app.updates import fleet, maintenance, schedule
from app.updates.selection import Selector
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.live import LiveServer
from tests.web.test_browser import CHROMIUM, _login, browser  # noqa: F401  (the module's Chromium fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

LONG_NAME = "backup-target-with-a-rather-long-name-01.eu-west-1.storage.example.internal"
WIDTHS = (1280, 390)
PHONE = 390

#: Reports every CSP violation as a console error, whatever Chromium itself logs.
CSP_LISTENER = """
document.addEventListener('securitypolicyviolation', e =>
  console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI + ' ' + (e.sample || '')));
"""

#: Counts the htmx requests whose swaps have settled (a request's in-band and out-of-band swaps
#: share its ``xhr``); on the host and fleet pages only the polls make htmx requests.
SETTLED_POLLS = """
window.__settledPolls = new Set();
document.addEventListener('htmx:afterSettle', e => window.__settledPolls.add(e.detail.xhr));
"""

#: Everything visible in the top bar that lies outside it (or outside the window).
OUTSIDE_BAR = """
() => {
  const bar = document.querySelector('header.topbar').getBoundingClientRect();
  const items = [...document.querySelectorAll('.topbar a, .topbar .who, .topbar .nav-toggle, .topbar button')]
    .filter(e => e.getClientRects().length > 0);
  return items.filter(e => {
    const r = e.getBoundingClientRect();
    return r.left < bar.left - 0.5 || r.right > bar.right + 0.5 || r.top < bar.top - 0.5
      || r.bottom > bar.bottom + 0.5 || r.right > window.innerWidth + 0.5;
  }).map(e => e.textContent.trim());
}
"""

SCROLLING_TABLES = (
    "() => [...document.querySelectorAll('.table-scroll')].filter(e => e.scrollWidth > e.clientWidth).length"
)

#: How many lines an element's text takes.
LINES = """e => { const r = document.createRange(); r.selectNodeContents(e);
  return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size; }"""

NAV_LINKS_SHOWN = "() => [...document.querySelectorAll('.topbar nav a')].filter(e => e.getClientRects().length).length"
NAV_LINKS = "() => document.querySelectorAll('.topbar nav a').length"


def _seed(cast) -> dict:
    """A database that has seen some use; returns the ids the pages need."""
    now = utcnow()
    long_host, _ = Host.enrol(LONG_NAME)
    long_host.agent_version, long_host.capabilities, long_host.last_seen = OLD_VERSION, ["update"], now
    more = [Host.enrol(f"web-{i}")[0] for i in range(2, 9)]
    for h in more:
        h.agent_version, h.last_seen = SERVER_VERSION, now
    db.session.flush()
    behind = cast.host_behind  # app-1: behind and "online"; its update runs (and polls) below
    params = {"version": SERVER_VERSION, "from_version": OLD_VERSION}
    for i in range(12):
        started = now - dt.timedelta(hours=i + 1)
        db.session.add(
            Job(
                host_id=behind.id, kind="update", status="failed", phase="verifying", params=params,
                actor="admin (token rmt_abcdefgh)", created_at=started, finished_at=started + dt.timedelta(seconds=42),
                error="the artifact's sha256 did not match: expected 3f5a9c0e1b2d4f6a8c0e2b4d6f8a0c2e, got "
                "9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a (the download was cut short by a proxy at 12.5 MiB)",
            )
        )  # fmt: skip
    db.session.add(
        Job(
            host_id=behind.id, kind="update", status="running", phase="downloading", params=params, actor="admin",
            bytes_done=3 * 1024 * 1024, bytes_total=12 * 1024 * 1024,
            created_at=now, updated_at=now, deadline=now + dt.timedelta(hours=1),
        )
    )  # fmt: skip
    names = [LONG_NAME, *(h.name for h in more), "app-1", "db-1", "web-1"]
    halted = FleetUpdate(
        target_version=SERVER_VERSION,
        status="halted",
        created_by="admin",
        created_at=now - dt.timedelta(days=1, microseconds=123456),
        finished_at=now - dt.timedelta(hours=23, microseconds=654321),
        halt_reason=f"host {LONG_NAME}: stayed offline past the 30 s grace to reconnect",
    )
    halted.hosts = [
        FleetUpdateHost(host_id=h.id, position=i, status="failed" if i == 0 else "pending")
        for i, h in enumerate([long_host, *more])
    ]
    db.session.add(halted)
    for i in range(30):
        AuditEvent.record(
            "admin (token rmt_abcdefgh)",
            "fleet.update_started",
            f"fleet_update:{i}",
            target_version=SERVER_VERSION,
            hosts=names,
            reason=f"host {LONG_NAME}: the agent did not announce the update capability",
        )
    Alert.raise_or_touch(
        "fleet_update_halted",
        "fleet",
        f"Fleet update 1 to {SERVER_VERSION} halted at host {LONG_NAME}: stayed offline past the 30 s grace",
    )
    acked = Alert.raise_or_touch("update_failed", str(long_host.id), "update timed out", host_id=long_host.id)
    acked.acknowledge("admin")
    Alert.raise_or_touch("update_failed", "gone", "an old failure", host_id=cast.host_online.id)
    Alert.resolve("update_failed", "gone")
    ApiToken.issue(cast.admin, "nightly inventory export for the storage team (read only, rotate yearly)")
    cast.host_offline.agent_version = OLD_VERSION
    db.session.commit()
    # A rollout waiting for db-1, offline (the clock is frozen: it waits for the whole test).
    fleet.start("admin", host_ids=[cast.host_offline.id])
    # A maintenance window with a long name and labels, and a rollout scheduled for later.
    window = {"name": "weekend nights for the storage team", "days": [5, 6], "start": "22:00", "end": "04:00"}
    maintenance.create("admin", {**window, "timezone": "America/Argentina/Buenos_Aires", "labels": {"site": "fra-1"}})
    when = utcnow() + dt.timedelta(days=2)
    schedule.create("admin", Selector(labels={"site": "fra-1"}), when, "America/Argentina/Buenos_Aires", True)
    return {"host": behind.id, "long_host": long_host.id, "halted": halted.id}


@pytest.fixture
def lived_in(app, cast):
    app.config.update(BUILD_AGENT_ON_START=False, FLEET_OFFLINE_GRACE_S=600)
    ids = _seed(cast)
    with LiveServer(app) as server:
        yield server, ids


def _measure(page) -> dict:
    return page.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,"
        " bar: document.querySelector('header.topbar').getBoundingClientRect().height})"
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_no_page_is_wider_than_the_window_and_the_nav_stays_in_its_bar(lived_in, browser, tmp_path, width):  # noqa: F811
    server, ids = lived_in
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.add_init_script(CSP_LISTENER)
    page.add_init_script(SETTLED_POLLS)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(15_000)
    pages = {
        "login": "/login",
        "dashboard": "/",
        "hosts": "/hosts",
        "host": f"/hosts/{ids['host']}",
        "long-host": f"/hosts/{ids['long_host']}",
        "alerts": "/alerts",
        "audit": "/audit",
        "fleet": "/settings/fleet-update",
        "report": f"/settings/fleet-update/{ids['halted']}/report",
        "tokens": "/settings/tokens",
        "users": "/settings/users",
        "windows": "/settings/maintenance-windows",
    }
    too_wide, outside, scrolling = {}, {}, {}
    for name, path in pages.items():
        if name == "dashboard":
            _login(page, server.admin_url)
        else:
            page.goto(server.admin_url + path)
        if name in ("host", "fleet"):
            assert page.get_attribute("#update-status, #fleet-status", "hx-trigger") == "every 1s"
            # a couple of polls, each swapping fragments in and out of band
            page.wait_for_function("() => window.__settledPolls.size >= 2")
        m = _measure(page)
        if m["scroll"] > m["inner"]:
            too_wide[name] = m["scroll"]
        if bad := page.evaluate(OUTSIDE_BAR):
            outside[name] = bad
        if width != PHONE and (n := page.evaluate(SCROLLING_TABLES)):
            scrolling[name] = n  # on a desktop every table fits its card
        page.screenshot(path=str(tmp_path / f"{name}-{width}.png"))
        if name in too_wide or name in outside or name in scrolling:
            # The whole page only where it broke: a full-page capture of all 24 pages was a third
            # of this test's time, and nothing reads the ones of pages that passed.
            page.screenshot(path=str(tmp_path / f"{name}-{width}-full.png"), full_page=True)
        if name != "login" and width == PHONE:
            assert page.evaluate(NAV_LINKS_SHOWN) == 0, f"{name}: the nav should fold behind Menu"
            assert m["bar"] < 80, f"{name}: the folded top bar is {m['bar']} px tall"

    if width == PHONE:  # open the menu: every link shows, inside the bar
        page.click("label.nav-toggle")
        assert page.evaluate(NAV_LINKS_SHOWN) == page.evaluate(NAV_LINKS) >= 6
        assert page.evaluate(OUTSIDE_BAR) == []
        assert _measure(page)["scroll"] <= width
        page.screenshot(path=str(tmp_path / f"menu-open-{width}.png"))
        page.click("text=Audit")
        page.wait_for_url(server.admin_url + "/audit")
    else:
        assert page.evaluate(NAV_LINKS_SHOWN) == page.evaluate(NAV_LINKS) >= 6
        assert not page.is_visible("label.nav-toggle")

    assert too_wide == {}, f"pages wider than {width} px: {too_wide}"
    assert outside == {}, f"top-bar items outside the bar: {outside}"
    assert scrolling == {}, f"tables that scroll sideways at {width} px: {scrolling}"
    assert problems == [], problems  # no CSP violation, no script error, also while polling


def test_a_phone_sees_the_wide_tables_scroll_inside_their_cards(lived_in, browser):  # noqa: F811
    server, ids = lived_in
    page = browser.new_page(viewport={"width": PHONE, "height": 800})
    _login(page, server.admin_url)
    page.goto(server.admin_url + "/audit")
    wrap = page.locator(".table-scroll").first
    assert wrap.evaluate("e => e.scrollWidth > e.clientWidth")  # the table is wider than the screen...
    assert wrap.evaluate("e => e.getBoundingClientRect().right") <= PHONE  # ...and scrolls inside its box
    # The time column stays on one line; the details column wraps instead of widening the table.
    first_row = page.locator("table.audit tbody tr", has_text=LONG_NAME).first
    assert first_row.locator("td.when").evaluate(LINES) == 1
    assert first_row.locator("td.details").evaluate(LINES) > 3
