"""The run report page in Chromium: its server-drawn SVG timeline, under the real CSP, on screen and in print.

A real server (waitress + werkzeug in this process) over a rollout written at known times: three
waves, every outcome. The browser logs in, opens the report, and the test reads the SVG's bars as
Chromium laid them out: how many, their colours (the computed fill, so neither the CSP nor a
stylesheet changed them), and that each wave's bars lie inside that wave's band, one band below
the other. Screenshots (and a PDF of the print view) stay in the test's tmp dir as artifacts.
"""

from __future__ import annotations

import datetime as dt

import pytest

from app.updates.report import COLOURS
from tests.support.live import LiveServer
from tests.support.rollouts import Line, big_rollout, seed_rollout
from tests.web.test_browser import _login, browser  # noqa: F401  (the module's Chromium fixture)
from tests.web.test_browser_layout import CSP_LISTENER

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

T0 = dt.datetime(2026, 1, 1, 11, 0, 0)
PHASES = {"downloading": 1.0, "verifying": 4.0, "staging": 5.0, "restarting": 6.0}

BARS = """() => [...document.querySelectorAll('svg#timeline rect.bar')].map(r => {
  const b = r.getBoundingClientRect();
  return {host: r.dataset.host, outcome: r.dataset.outcome, wave: +r.dataset.wave,
          fill: getComputedStyle(r).fill, top: b.top, bottom: b.bottom, left: b.left, right: b.right};
})"""
BANDS = """() => [...document.querySelectorAll('svg#timeline rect.wave-band')].map(r => {
  const b = r.getBoundingClientRect();
  return {wave: +r.dataset.wave, top: b.top, bottom: b.bottom};
})"""


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def watched(browser, width=1280, height=900):  # noqa: F811
    page = browser.new_page(viewport={"width": width, "height": height})
    page.add_init_script(CSP_LISTENER)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(15_000)
    return page, problems


@pytest.fixture
def report_server(app, cast):
    app.config.update(BUILD_AGENT_ON_START=False)
    lines = [
        Line("canary-1", wave=0, dispatch_s=0, took_s=12, phases=PHASES),
        Line("web-1a", wave=1, dispatch_s=20, took_s=15, phases=PHASES),
        Line("web-1b", wave=1, dispatch_s=20, took_s=25, phases=PHASES),
        Line("web-1c", wave=1, dispatch_s=21, took_s=30, outcome="failed", phases={"downloading": 1.0},
             error="timed out after 90 s waiting for version 2.0.0"),
        Line("web-2a", wave=2, dispatch_s=60, took_s=10, phases=PHASES, wait_s=50),
        Line("web-2b", wave=2, dispatch_s=61, took_s=4, outcome="cancelled", error="host deleted"),
        Line("web-2c", wave=2, outcome="skipped", dispatch_s=None, took_s=61),
    ]  # fmt: skip
    fid = seed_rollout(lines, T0, status="halted", took_s=75, halt_reason="host web-1c: timed out")
    with LiveServer(app) as server:
        yield server, fid


def test_the_report_page_draws_one_coloured_bar_per_host_in_wave_bands(report_server, browser, tmp_path):  # noqa: F811
    server, fid = report_server
    page, problems = watched(browser)
    _login(page, server.admin_url)
    page.goto(f"{server.admin_url}/settings/fleet-update")
    page.click("#fleet-report-link")  # the rollout card links its report
    page.wait_for_url(f"{server.admin_url}/settings/fleet-update/{fid}/report")
    page.wait_for_selector("svg#timeline")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    page.locator("#report-timeline").screenshot(path=str(tmp_path / "timeline.png"))

    bars = page.evaluate(BARS)
    assert sorted(b["host"] for b in bars) == ["canary-1", "web-1a", "web-1b", "web-1c", "web-2a", "web-2b"]
    by_host = {b["host"]: b for b in bars}
    for b in bars:
        assert b["fill"] == rgb(COLOURS[b["outcome"]]), b
    assert {h: by_host[h]["outcome"] for h in ("web-1c", "web-2b", "web-1a")} == {
        "web-1c": "failed",
        "web-2b": "cancelled",
        "web-1a": "succeeded",
    }
    assert len({b["fill"] for b in bars}) == 3  # succeeded, failed, cancelled: told apart by colour
    # longer updates draw longer bars, later dispatches start further right
    width = {h: b["right"] - b["left"] for h, b in by_host.items()}
    assert width["web-1c"] > width["web-1b"] > width["web-1a"] > width["web-2b"]
    assert by_host["web-2a"]["left"] > by_host["web-1a"]["left"] > by_host["canary-1"]["left"]

    bands = page.evaluate(BANDS)
    assert [b["wave"] for b in bands] == [0, 1, 2]
    for upper, lower in zip(bands, bands[1:], strict=False):
        assert upper["bottom"] <= lower["top"] + 0.5  # one band below the other, not overlapping
    band = {b["wave"]: b for b in bands}
    for b in bars:
        assert band[b["wave"]]["top"] - 0.5 <= b["top"] and b["bottom"] <= band[b["wave"]]["bottom"] + 0.5, b
    assert page.locator("svg#timeline line.wave-rule").count() == 2
    assert page.locator("svg#timeline rect.wait").count() == 1  # web-2a was waited on

    summary = page.locator("#report-summary").inner_text()
    assert "p50 12.0 s" in summary and "max 30.0 s" in summary
    assert "timed out after <n> s waiting for version <version>" in page.locator("#report-failures").inner_text()
    assert "web-2a" in page.locator("#report-waits").inner_text()

    # In print the timeline does not scroll and the navigation goes; the PDF is kept as an artifact.
    page.emulate_media(media="print")
    assert page.evaluate("getComputedStyle(document.querySelector('.timeline-scroll')).maxHeight") == "none"
    assert not page.is_visible("header.topbar")
    page.pdf(path=str(tmp_path / "report.pdf"))
    assert (tmp_path / "report.pdf").stat().st_size > 1000
    assert problems == [], problems  # no CSP violation, no script error


def test_a_thousand_host_report_scrolls_its_timeline_and_keeps_every_bar(app, cast, browser, tmp_path):  # noqa: F811
    app.config.update(BUILD_AGENT_ON_START=False)
    fid = big_rollout(1000, T0)
    with LiveServer(app) as server:
        page, problems = watched(browser)
        _login(page, server.admin_url)
        page.goto(f"{server.admin_url}/settings/fleet-update/{fid}/report")
        page.wait_for_selector("svg#timeline")
        page.screenshot(path=str(tmp_path / "report-1000.png"))
        bars = page.evaluate(BARS)
        assert len(bars) == 1000
        assert {b["outcome"] for b in bars} == {"succeeded", "failed"}
        assert sum(b["fill"] == rgb(COLOURS["failed"]) for b in bars) == 10
        box = page.evaluate(
            "() => { const e = document.querySelector('.timeline-scroll');"
            " return {scroll: e.scrollHeight, client: e.clientHeight, page: document.documentElement.scrollWidth,"
            " inner: window.innerWidth}; }"
        )
        assert box["scroll"] > 4 * box["client"]  # the timeline scrolls inside its box...
        assert box["client"] <= 900 * 0.7 + 1 and box["page"] <= box["inner"]  # ...and the page stays in the window
        assert page.locator("svg#timeline rect.wave-band").count() == 20
        assert problems == [], problems
