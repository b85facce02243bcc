"""The RBAC matrix: every route of both planes x every kind of caller, over real HTTP.

The real two-plane server runs in this process (waitress for the admin plane, werkzeug for the
agent plane, both behind ``PlaneMiddleware``) and each caller sends real requests with
``requests``. Every route in ``app.url_map`` must have a row in ``MATRIX`` (a new route without
one fails ``test_every_route_has_an_rbac_expectation``), and each row says what every principal
gets on the route's own plane; on the other plane every principal must get the middleware's 404.

Principals:

- ``anonymous``     no credentials; it holds an anonymous session (from ``GET /login``) and sends
                    its CSRF token, so CSRF never hides the authorization answer;
- ``viewer``, ``admin``  a logged-in browser session sending ``X-CSRFToken`` (read from the page's
                    ``<meta name="csrf-token">``) on every request;
- ``viewer_token``, ``admin_token``  ``Authorization: Bearer <API token>`` and no cookies;
- ``agent_token``   ``Authorization: Bearer <agent token>`` on both planes, no cookies.

What the table pins down (the interesting cells):

- pages answer anonymous callers with 302 to ``/login``; bearer callers count as anonymous on pages
  (API tokens authenticate ``/api`` only), and page POSTs from a cookie-less bearer client fail
  Flask-WTF's CSRF check with 400 before any view runs;
- ``/api`` answers anonymous and agent-token callers 401 (JSON), viewers 403 (JSON) on mutations and
  200 on reads, whether they come with a session or an API token;
- ``/agent/download/<version>`` needs an agent token: every other caller, admin included, gets 401;
  the install script, unit file and health check are public;
- ``/ws/agent``: a plain (non-WebSocket) GET is answered 400 by URL routing (the rule is a
  WebSocket rule) before the agent-token check runs, so it is 400 for everyone and never reaches the
  socket handler; a real upgrade handshake is 101 with an agent token and 401 for everyone else.

Objects in paths are real (cast hosts, a job, a fleet update), so a 404 never masks an
authorization answer; a route that changes or destroys something gets a fresh object per
principal, and the test checks the side effect happened exactly when the matrix says the caller is
allowed (a 403 must also mean nothing changed).
"""

from __future__ import annotations

import base64
import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
import requests
import sqlalchemy as sa

from app.extensions import db
from app.models import Alert, ApiToken, AuditEvent, FleetUpdate, FleetUpdateHost, Host, Job, MaintenanceWindow, User
from app.notify import Notifier, Webhook
from app.runtime import runtime
from app.serve import AGENT_PLANE_PREFIXES
from app.updates import fleet
from tests.conftest import OLD_VERSION, SERVER_VERSION, Cast
from tests.support.live import LiveServer
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)

PRINCIPALS = ("anonymous", "viewer", "admin", "viewer_token", "admin_token", "agent_token")
BEARER_PRINCIPALS = ("viewer_token", "admin_token", "agent_token")
WS_HANDSHAKE = "WS"  # pseudo-method: a real WebSocket upgrade request on a GET route


@dataclass(frozen=True)
class Redirect:
    status: int
    path: str

    def __str__(self) -> str:
        return f"{self.status}->{self.path}"


Expect = int | Redirect

TO_LOGIN = Redirect(302, "/login")
TO_DASHBOARD = Redirect(302, "/")
CSRF = 400  # page POST without a session: Flask-WTF refuses it before the view (and its role check)


def expect(
    anonymous: Expect, viewer: Expect, admin: Expect, viewer_token: Expect, admin_token: Expect, agent_token: Expect
) -> dict[str, Expect]:
    return dict(zip(PRINCIPALS, (anonymous, viewer, admin, viewer_token, admin_token, agent_token), strict=True))


PAGE = expect(TO_LOGIN, 200, 200, TO_LOGIN, TO_LOGIN, TO_LOGIN)
ADMIN_PAGE = expect(TO_LOGIN, 403, 200, TO_LOGIN, TO_LOGIN, TO_LOGIN)
PUBLIC = expect(200, 200, 200, 200, 200, 200)
API_READ = expect(401, 200, 200, 200, 200, 401)


def admin_form(ok: Expect) -> dict[str, Expect]:
    """An admin-only page POST (CSRF-protected form or HTMX action)."""
    return expect(TO_LOGIN, 403, ok, CSRF, CSRF, CSRF)


def api_admin(ok: int) -> dict[str, Expect]:
    return expect(401, 403, ok, 403, ok, 401)


def agent_only(ok: int) -> dict[str, Expect]:
    return expect(401, 401, 401, 401, 401, ok)


# --- the world: real objects and throwaways ----------------------------------------------------

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}-{os.getpid()}"


@dataclass
class Target:
    """One request: the path, a body, and what a side-effect check needs to know."""

    path: str
    form: dict | None = None
    json: dict | None = None
    ctx: object = None


class World:
    """The cast, tokens, a job, a fleet update, a live server and a connected agent."""

    def __init__(self, app):
        self.app = app
        self.cast = Cast()
        self.host_id = self.cast.host_online.id
        self.agent_token = self.cast.host_online_token
        self.tokens = {}
        for who, user in (("viewer_token", self.cast.viewer), ("admin_token", self.cast.admin)):
            _, self.tokens[who] = ApiToken.issue(user, "rbac")
        job = Job(
            host_id=self.cast.host_offline.id,
            kind="update",
            status="failed",
            phase="dispatched",
            actor="admin",
            params={"version": SERVER_VERSION, "from_version": OLD_VERSION},
            error="timed out",
        )
        db.session.add(job)
        db.session.commit()
        self.job_id = job.id
        fu = fleet.start("admin", host_ids=[self.cast.host_behind.id])
        fleet.cancel(fu.id, "admin")
        self.fleet_id = fu.id
        self.behind_id, self.admin_id = self.cast.host_behind.id, self.cast.admin.id
        self.agents: list[ScriptedAgent] = []
        self.live: LiveServer | None = None
        # A destination, so the test-notification button has something to queue for (never sent:
        # the notifier thread is not started here).
        rt = runtime(app)
        rt.notifier = Notifier([Webhook("http://127.0.0.1:9/rbac", "rbac-webhook-secret")], rt.clock.now)

    # -- lifecycle

    def start(self) -> None:
        self.live = LiveServer(self.app).__enter__()
        # The cast's online host, really online: pings get answered.
        self.connect_agent(self.host_id, self.agent_token, SERVER_VERSION)

    def stop(self) -> None:
        for a in self.agents:
            a.disconnect()
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def connect_agent(self, host_id: int, token: str, version: str) -> None:
        agent = ScriptedAgent(self.live.agent_ws_url, token, version)
        agent.connect()
        self.agents.append(agent)
        wait_until(lambda: runtime(self.app).connections.is_connected(host_id), what="agent registered")

    def base(self, plane: str) -> str:
        return self.live.admin_url if plane == "admin" else self.live.agent_http_url

    # -- throwaway objects (one per principal, for routes that change what they touch)

    def new_host(self) -> int:
        db.session.remove()
        host, _ = Host.enrol(unique("rbac"))
        db.session.commit()
        return host.id

    def new_online_behind_host(self) -> int:
        db.session.remove()
        host, token = Host.enrol(unique("rbac-behind"))
        db.session.commit()
        self.connect_agent(host.id, token, OLD_VERSION)
        return host.id

    def new_alert(self) -> int:
        db.session.remove()
        alert = Alert.raise_or_touch("update_failed", unique("rbac"), "an alert to acknowledge")
        db.session.commit()
        return alert.id

    def new_admin_token(self) -> int:
        db.session.remove()
        tok, _ = ApiToken.issue(db.session.get(User, self.admin_id), unique("rbac"))
        db.session.commit()
        return tok.id

    def new_user(self, role: str = "viewer", disabled: bool = False) -> int:
        """A throwaway account (password ``<role>-pass-123``), so no row touches the cast's users."""
        db.session.remove()
        user = User.create(unique(f"rbac-{role}"), f"{role}-pass-123", role)
        db.session.flush()
        if disabled:
            user.disable("rbac-setup")
        db.session.commit()
        return user.id

    def new_user_token(self) -> int:
        db.session.remove()
        tok, _ = ApiToken.issue(db.session.get(User, self.new_user()), unique("rbac"))
        db.session.commit()
        return tok.id

    def new_window(self) -> int:
        from app.updates import maintenance

        db.session.remove()
        body = {"name": unique("rbac-window"), "days": [5], "start": "02:00", "end": "04:00", "timezone": "UTC"}
        return maintenance.create("rbac-setup", body).id

    def username(self, user_id: int) -> str:
        db.session.remove()
        return db.session.get(User, user_id).username

    def no_rollout(self) -> None:
        db.session.remove()
        fu = fleet.running()
        if fu is not None:
            fleet.cancel(fu.id, "rbac-setup")

    def new_rollout(self) -> int:
        self.no_rollout()
        return fleet.start("rbac-setup", host_ids=[self.behind_id]).id

    def new_paused_rollout(self) -> int:
        fid = self.new_rollout()
        fleet.pause(fid, "rbac-setup")
        return fid

    def new_retryable_rollout(self) -> int:
        """A cancelled rollout whose one host was skipped: a retry takes that host again."""
        fid = self.new_rollout()
        fleet.skip_host(fid, self.behind_id, "rbac-setup")
        fleet.cancel(fid, "rbac-setup")
        return fid

    def new_revertable_rollout(self) -> int:
        """A finished rollout that took one host from a version the server kept (signed) to another."""
        from app.updates import releases

        self.no_rollout()
        if releases.kept_release(OLD_VERSION) is None:
            path = os.path.join(self.app.config["RELEASES_DIR"], "rbac-old.pyz")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(os.urandom(1024))
            key = releases.signing_key()
            sig = releases.sign_file(path, OLD_VERSION, "py3-any", key) if key else None
            releases.register(path, OLD_VERSION, "py3-any", sig)
        fu = FleetUpdate(target_version=SERVER_VERSION, status="succeeded", created_by="rbac-setup")
        fu.hosts = [FleetUpdateHost(host_id=self.behind_id, position=0, status="succeeded", from_version=OLD_VERSION)]
        db.session.add(fu)
        db.session.commit()
        return fu.id

    def retried(self, fid: int) -> bool:
        db.session.remove()
        return db.session.scalar(sa.select(FleetUpdate.id).where(FleetUpdate.parent_id == fid)) is not None

    # -- side effects, read fresh from the database

    def row(self, model, key):
        db.session.remove()
        return db.session.get(model, key)

    def has_running_job(self, host_id: int) -> bool:
        db.session.remove()
        q = sa.select(Job.id).where(Job.host_id == host_id, Job.status == "running")
        return db.session.scalar(q) is not None

    def token_replaced(self, ctx: tuple[int, str]) -> bool:
        host_id, old_hash = ctx
        return self.row(Host, host_id).token_hash != old_hash

    def host_named(self, name: str) -> bool:
        db.session.remove()
        return db.session.scalar(sa.select(Host.id).where(Host.name == name)) is not None

    def window_named(self, name: str) -> bool:
        db.session.remove()
        return db.session.scalar(sa.select(MaintenanceWindow.id).where(MaintenanceWindow.name == name)) is not None

    def token_named(self, name: str) -> bool:
        db.session.remove()
        return db.session.scalar(sa.select(ApiToken.id).where(ApiToken.name == name)) is not None

    def audit_count(self, action: str) -> int:
        db.session.remove()
        return db.session.scalar(sa.select(sa.func.count(AuditEvent.id)).where(AuditEvent.action == action))

    def rollout_running(self) -> bool:
        db.session.remove()
        return fleet.running() is not None


# --- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    endpoint: str
    method: str
    plane: str
    expect: dict[str, Expect]
    target: Callable[[World], Target]
    #: The status of an allowed mutation; with ``effect``, the side effect must happen iff it is seen.
    ok: Expect | None = None
    effect: Callable[[World, Target], bool] | None = None
    #: Log in afresh, as a throwaway user of the same role (the route changes the session: login,
    #: logout; a logout ends every session of its user).
    fresh_principal: bool = False
    note: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.endpoint, self.method)


def path(p: str) -> Callable[[World], Target]:
    return lambda w: Target(p.format(w=w))


def _form_target(p: str, prefix: str) -> Callable[[World], Target]:
    def make(w):
        name = unique(prefix)
        return Target(p, form={"name": name}, ctx=name)

    return make


def _json_target(p: str, prefix: str) -> Callable[[World], Target]:
    def make(w):
        name = unique(prefix)
        return Target(p, json={"name": name}, ctx=name)

    return make


def _host_target(p: str, make_host: str, **body) -> Callable[[World], Target]:
    def make(w):
        host_id = getattr(w, make_host)()
        return Target(p.format(id=host_id), ctx=host_id, **body)

    return make


def _rollout_target(p: str, **body) -> Callable[[World], Target]:
    def make(w):
        fid = w.new_rollout()
        return Target(p.format(id=fid), ctx=fid, **body)

    return make


def _made_rollout_target(p: str, make_rollout: str, **body) -> Callable[[World], Target]:
    def make(w):
        fid = getattr(w, make_rollout)()
        return Target(p.format(id=fid, host=w.behind_id), ctx=fid, **body)

    return make


def _fresh_fleet_target(p: str, **body) -> Callable[[World], Target]:
    def make(w):
        w.no_rollout()
        # A rollout takes only hosts that are online and behind: one of its own, so the case
        # does not depend on another case (run before it, or not) having connected one.
        w.new_online_behind_host()
        return Target(p, **body)

    return make


def _reissue_target(p: str) -> Callable[[World], Target]:
    def make(w):
        host_id = w.new_host()
        return Target(p.format(id=host_id), ctx=(host_id, w.row(Host, host_id).token_hash))

    return make


def _alert_target(p: str) -> Callable[[World], Target]:
    def make(w):
        alert_id = w.new_alert()
        return Target(p.format(id=alert_id), ctx=alert_id)

    return make


def _token_target(w):
    tid = w.new_admin_token()
    return Target(f"/settings/tokens/{tid}/revoke", ctx=tid)


def _user_target(p: str, **kw) -> Callable[[World], Target]:
    def make(w):
        uid = w.new_user(**kw)
        return Target(p.format(id=uid), ctx=uid, json={} if p.startswith("/api/") else None)

    return make


def _user_token_target(p: str) -> Callable[[World], Target]:
    def make(w):
        tid = w.new_user_token()
        return Target(p.format(id=tid), ctx=tid, json={} if p.startswith("/api/") else None)

    return make


def _window_target(p: str, **body) -> Callable[[World], Target]:
    def make(w):
        wid = w.new_window()
        return Target(p.format(id=wid), ctx=wid, **body)

    return make


def _new_window_target(p: str, api: bool) -> Callable[[World], Target]:
    def make(w):
        name = unique("rbac-window")
        fields = {"name": name, "start": "01:00", "end": "03:00", "timezone": "Europe/Berlin"}
        if api:
            return Target(p, json={**fields, "days": [6]}, ctx=name)
        return Target(p, form={**fields, "days": "6"}, ctx=name)

    return make


def _audit_count_target(p: str, action: str) -> Callable[[World], Target]:
    """A POST whose effect is one more audit record of ``action``."""
    return lambda w: Target(p, ctx=w.audit_count(action))


def _login_target(w):
    return Target("/login", form={"username": "viewer", "password": "viewer-pass-123"})


# fmt: off  (a table reads best one row per call)
MATRIX: list[Case] = [
    # --- admin plane: pages ---
    Case("main.dashboard", "GET", "admin", PAGE, path("/")),
    Case("main.host_list", "GET", "admin", PAGE, path("/hosts")),
    Case("main.host_detail", "GET", "admin", PAGE, path("/hosts/{w.host_id}")),
    Case("main.update_status", "GET", "admin", PAGE, path("/hosts/{w.host_id}/update-status")),
    Case("main.alert_list", "GET", "admin", PAGE, path("/alerts")),
    Case("main.audit", "GET", "admin", PAGE, path("/audit")),
    Case("main.host_new", "GET", "admin", ADMIN_PAGE, path("/hosts/new")),
    Case(
        "main.host_new",
        "POST",
        "admin",
        admin_form(201),
        _form_target("/hosts/new", "rbac-page"),
        ok=201,
        effect=lambda w, t: w.host_named(t.ctx),
    ),
    Case(
        "main.host_update",
        "POST",
        "admin",
        admin_form(303),
        _host_target("/hosts/{id}/update", "new_online_behind_host"),
        ok=303,
        effect=lambda w, t: w.has_running_job(t.ctx),
    ),
    Case(
        "main.host_revoke",
        "POST",
        "admin",
        admin_form(303),
        _host_target("/hosts/{id}/revoke", "new_host"),
        ok=303,
        effect=lambda w, t: w.row(Host, t.ctx).revoked_at is not None,
    ),
    Case(
        "main.host_token",
        "POST",
        "admin",
        admin_form(200),
        _reissue_target("/hosts/{id}/token"),
        ok=200,
        effect=lambda w, t: w.token_replaced(t.ctx),
    ),
    Case(
        "main.alert_ack",
        "POST",
        "admin",
        admin_form(303),
        _alert_target("/alerts/{id}/ack"),
        ok=303,
        effect=lambda w, t: w.row(Alert, t.ctx).acknowledged_at is not None,
    ),
    Case(
        "main.host_delete",
        "POST",
        "admin",
        admin_form(303),
        _host_target("/hosts/{id}/delete", "new_host"),
        ok=303,
        effect=lambda w, t: w.row(Host, t.ctx) is None,
    ),
    Case(
        "main.fleet_plan",
        "POST",
        "admin",
        admin_form(200),
        lambda w: Target("/settings/fleet-update/plan", form={"max_in_flight": "2"}),
    ),
    Case(
        "main.fleet_pause",
        "POST",
        "admin",
        admin_form(303),
        _rollout_target("/settings/fleet-update/{id}/pause"),
        ok=303,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).paused_at is not None,
    ),
    Case(
        "main.fleet_resume",
        "POST",
        "admin",
        admin_form(303),
        _made_rollout_target("/settings/fleet-update/{id}/resume", "new_paused_rollout"),
        ok=303,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).paused_at is None,
    ),
    Case(
        "main.fleet_skip_host",
        "POST",
        "admin",
        admin_form(303),
        _made_rollout_target("/settings/fleet-update/{id}/hosts/{host}/skip", "new_rollout"),
        ok=303,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).hosts[0].status == "skipped",
    ),
    Case(
        "main.fleet_retry",
        "POST",
        "admin",
        admin_form(303),
        _made_rollout_target("/settings/fleet-update/{id}/retry", "new_retryable_rollout"),
        ok=303,
        effect=lambda w, t: w.retried(t.ctx),
    ),
    Case(
        "main.host_labels_edit",
        "POST",
        "admin",
        admin_form(303),
        _host_target("/hosts/{id}/labels", "new_host", form={"labels": "rbac=page"}),
        ok=303,
        effect=lambda w, t: w.row(Host, t.ctx).labels == {"rbac": "page"},
    ),
    Case(
        "main.fleet_revert",
        "POST",
        "admin",
        admin_form(303),
        _made_rollout_target("/settings/fleet-update/{id}/revert", "new_revertable_rollout"),
        ok=303,
        effect=lambda w, t: w.retried(t.ctx),
    ),
    Case("main.notifications", "GET", "admin", PAGE, path("/settings/notifications")),
    Case("main.windows", "GET", "admin", PAGE, path("/settings/maintenance-windows")),
    Case(
        "main.window_add",
        "POST",
        "admin",
        admin_form(303),
        _new_window_target("/settings/maintenance-windows", api=False),
        ok=303,
        effect=lambda w, t: w.window_named(t.ctx),
    ),
    Case(
        "main.window_delete",
        "POST",
        "admin",
        admin_form(303),
        _window_target("/settings/maintenance-windows/{id}/delete"),
        ok=303,
        effect=lambda w, t: w.row(MaintenanceWindow, t.ctx) is None,
    ),
    Case(
        "main.notifications_test",
        "POST",
        "admin",
        admin_form(303),
        _audit_count_target("/settings/notifications/test", "notifications.test_sent"),
        ok=303,
        effect=lambda w, t: w.audit_count("notifications.test_sent") > t.ctx,
    ),
    Case("main.fleet_update", "GET", "admin", PAGE, path("/settings/fleet-update"), note="viewers read it"),
    Case("main.fleet_status", "GET", "admin", PAGE, path("/settings/fleet-update/status")),
    Case("main.fleet_report", "GET", "admin", PAGE, path("/settings/fleet-update/{w.fleet_id}/report")),
    Case(
        "main.fleet_start",
        "POST",
        "admin",
        admin_form(303),
        _fresh_fleet_target("/settings/fleet-update/start"),
        ok=303,
        effect=lambda w, t: w.rollout_running(),
    ),
    Case(
        "main.fleet_cancel",
        "POST",
        "admin",
        admin_form(303),
        _rollout_target("/settings/fleet-update/{id}/cancel"),
        ok=303,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).status == "cancelled",
    ),
    Case(
        "auth.login",
        "GET",
        "admin",
        expect(200, TO_DASHBOARD, TO_DASHBOARD, 200, 200, 200),
        path("/login"),
        note="logged-in users are sent on to the dashboard; bearer callers are anonymous on pages",
    ),
    Case(
        "auth.login",
        "POST",
        "admin",
        expect(TO_DASHBOARD, TO_DASHBOARD, TO_DASHBOARD, CSRF, CSRF, CSRF),
        _login_target,
        fresh_principal=True,
        note="anonymous: valid viewer credentials log in; logged-in users are redirected without a new login",
    ),
    Case(
        "auth.logout",
        "POST",
        "admin",
        expect(TO_LOGIN, TO_LOGIN, TO_LOGIN, CSRF, CSRF, CSRF),
        path("/logout"),
        fresh_principal=True,
    ),
    Case("auth.tokens", "GET", "admin", ADMIN_PAGE, path("/settings/tokens")),
    Case(
        "auth.tokens",
        "POST",
        "admin",
        admin_form(200),
        _form_target("/settings/tokens", "rbac-token"),
        ok=200,
        effect=lambda w, t: w.token_named(t.ctx),
    ),
    Case(
        "auth.revoke_token",
        "POST",
        "admin",
        admin_form(303),
        _token_target,
        ok=303,
        effect=lambda w, t: w.row(ApiToken, t.ctx).revoked_at is not None,
    ),
    Case("auth.users", "GET", "admin", ADMIN_PAGE, path("/settings/users"), note="viewers may not list accounts"),
    Case(
        "auth.user_disable",
        "POST",
        "admin",
        admin_form(303),
        _user_target("/settings/users/{id}/disable"),
        ok=303,
        effect=lambda w, t: w.row(User, t.ctx).disabled_at is not None,
    ),
    Case(
        "auth.user_enable",
        "POST",
        "admin",
        admin_form(303),
        _user_target("/settings/users/{id}/enable", disabled=True),
        ok=303,
        effect=lambda w, t: w.row(User, t.ctx).disabled_at is None,
    ),
    Case(
        "auth.user_delete",
        "POST",
        "admin",
        admin_form(303),
        _user_target("/settings/users/{id}/delete"),
        ok=303,
        effect=lambda w, t: w.row(User, t.ctx) is None,
    ),
    Case(
        "auth.user_token_revoke",
        "POST",
        "admin",
        admin_form(303),
        _user_token_target("/settings/users/tokens/{id}/revoke"),
        ok=303,
        effect=lambda w, t: w.row(ApiToken, t.ctx).revoked_at is not None,
    ),
    Case("static", "GET", "admin", PUBLIC, path("/static/htmx.min.js")),
    # --- admin plane: JSON API ---
    Case("api.version", "GET", "admin", API_READ, path("/api/version")),
    Case("api.host_list", "GET", "admin", API_READ, path("/api/hosts")),
    Case(
        "api.host_create",
        "POST",
        "admin",
        api_admin(201),
        _json_target("/api/hosts", "rbac-api"),
        ok=201,
        effect=lambda w, t: w.host_named(t.ctx),
    ),
    Case("api.host_get", "GET", "admin", API_READ, path("/api/hosts/{w.host_id}")),
    Case(
        "api.host_delete",
        "DELETE",
        "admin",
        api_admin(204),
        _host_target("/api/hosts/{id}", "new_host"),
        ok=204,
        effect=lambda w, t: w.row(Host, t.ctx) is None,
    ),
    Case("api.host_jobs", "GET", "admin", API_READ, path("/api/hosts/{w.host_id}/jobs")),
    Case("api.host_ping", "POST", "admin", api_admin(200), path("/api/hosts/{w.host_id}/ping")),
    Case(
        "api.host_revoke",
        "POST",
        "admin",
        api_admin(200),
        _host_target("/api/hosts/{id}/revoke", "new_host"),
        ok=200,
        effect=lambda w, t: w.row(Host, t.ctx).revoked_at is not None,
    ),
    Case(
        "api.host_labels_put",
        "PUT",
        "admin",
        api_admin(200),
        _host_target("/api/hosts/{id}/labels", "new_host", json={"labels": {"rbac": "put"}}),
        ok=200,
        effect=lambda w, t: w.row(Host, t.ctx).labels == {"rbac": "put"},
    ),
    Case(
        "api.host_labels_patch",
        "PATCH",
        "admin",
        api_admin(200),
        _host_target("/api/hosts/{id}/labels", "new_host", json={"labels": {"rbac": "patch"}}),
        ok=200,
        effect=lambda w, t: w.row(Host, t.ctx).labels == {"rbac": "patch"},
    ),
    Case(
        "api.host_token",
        "POST",
        "admin",
        api_admin(200),
        _reissue_target("/api/hosts/{id}/token"),
        ok=200,
        effect=lambda w, t: w.token_replaced(t.ctx),
    ),
    Case(
        "api.host_update",
        "POST",
        "admin",
        api_admin(202),
        _host_target("/api/hosts/{id}/update", "new_online_behind_host", json={}),
        ok=202,
        effect=lambda w, t: w.has_running_job(t.ctx),
    ),
    Case("api.job_get", "GET", "admin", API_READ, path("/api/jobs/{w.job_id}")),
    Case("api.alert_list", "GET", "admin", API_READ, path("/api/alerts")),
    Case(
        "api.alert_ack",
        "POST",
        "admin",
        api_admin(200),
        _alert_target("/api/alerts/{id}/ack"),
        ok=200,
        effect=lambda w, t: w.row(Alert, t.ctx).acknowledged_at is not None,
    ),
    Case("api.audit", "GET", "admin", API_READ, path("/api/audit")),
    Case(
        "api.token_create",
        "POST",
        "admin",
        api_admin(201),
        _json_target("/api/tokens", "rbac-apitoken"),
        ok=201,
        effect=lambda w, t: w.token_named(t.ctx),
    ),
    Case(
        "api.fleet_start",
        "POST",
        "admin",
        api_admin(201),
        _fresh_fleet_target("/api/fleet/update", json={}),
        ok=201,
        effect=lambda w, t: w.rollout_running(),
    ),
    Case("api.notifications", "GET", "admin", API_READ, path("/api/notifications")),
    Case("api.window_list", "GET", "admin", API_READ, path("/api/maintenance-windows")),
    Case("api.window_get", "GET", "admin", API_READ, _window_target("/api/maintenance-windows/{id}")),
    Case(
        "api.window_create",
        "POST",
        "admin",
        api_admin(201),
        _new_window_target("/api/maintenance-windows", api=True),
        ok=201,
        effect=lambda w, t: w.window_named(t.ctx),
    ),
    Case(
        "api.window_update",
        "PATCH",
        "admin",
        api_admin(200),
        _window_target("/api/maintenance-windows/{id}", json={"end": "05:00"}),
        ok=200,
        effect=lambda w, t: w.row(MaintenanceWindow, t.ctx).end == "05:00",
    ),
    Case(
        "api.window_delete",
        "DELETE",
        "admin",
        api_admin(204),
        _window_target("/api/maintenance-windows/{id}"),
        ok=204,
        effect=lambda w, t: w.row(MaintenanceWindow, t.ctx) is None,
    ),
    # A plan changes nothing: it is admin-only because it answers what an admin's start would do.
    Case("api.fleet_plan", "POST", "admin", api_admin(200), lambda w: Target("/api/fleet/plan", json={})),
    Case("api.fleet_list", "GET", "admin", API_READ, path("/api/fleet-updates")),
    Case("api.fleet_get", "GET", "admin", API_READ, path("/api/fleet-updates/{w.fleet_id}")),
    Case("api.fleet_report", "GET", "admin", API_READ, path("/api/fleet-updates/{w.fleet_id}/report")),
    Case("api.fleet_report_csv", "GET", "admin", API_READ, path("/api/fleet-updates/{w.fleet_id}/report.csv")),
    Case(
        "api.fleet_cancel",
        "POST",
        "admin",
        api_admin(200),
        _rollout_target("/api/fleet-updates/{id}/cancel", json={}),
        ok=200,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).status == "cancelled",
    ),
    Case(
        "api.fleet_pause",
        "POST",
        "admin",
        api_admin(200),
        _rollout_target("/api/fleet-updates/{id}/pause", json={}),
        ok=200,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).paused_at is not None,
    ),
    Case(
        "api.fleet_resume",
        "POST",
        "admin",
        api_admin(200),
        _made_rollout_target("/api/fleet-updates/{id}/resume", "new_paused_rollout", json={}),
        ok=200,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).paused_at is None,
    ),
    Case(
        "api.fleet_skip_host",
        "POST",
        "admin",
        api_admin(200),
        _made_rollout_target("/api/fleet-updates/{id}/hosts/{host}/skip", "new_rollout", json={}),
        ok=200,
        effect=lambda w, t: w.row(FleetUpdate, t.ctx).hosts[0].status == "skipped",
    ),
    Case(
        "api.fleet_retry",
        "POST",
        "admin",
        api_admin(201),
        _made_rollout_target("/api/fleet-updates/{id}/retry", "new_retryable_rollout", json={}),
        ok=201,
        effect=lambda w, t: w.retried(t.ctx),
    ),
    Case(
        "api.fleet_revert",
        "POST",
        "admin",
        api_admin(201),
        _made_rollout_target("/api/fleet-updates/{id}/revert", "new_revertable_rollout", json={}),
        ok=201,
        effect=lambda w, t: w.retried(t.ctx),
    ),
    Case("api.user_list", "GET", "admin", api_admin(200), path("/api/users"), note="viewers may not list accounts"),
    Case(
        "api.user_disable",
        "POST",
        "admin",
        api_admin(200),
        _user_target("/api/users/{id}/disable"),
        ok=200,
        effect=lambda w, t: w.row(User, t.ctx).disabled_at is not None,
    ),
    Case(
        "api.user_enable",
        "POST",
        "admin",
        api_admin(200),
        _user_target("/api/users/{id}/enable", disabled=True),
        ok=200,
        effect=lambda w, t: w.row(User, t.ctx).disabled_at is None,
    ),
    Case(
        "api.user_delete",
        "DELETE",
        "admin",
        api_admin(204),
        _user_target("/api/users/{id}"),
        ok=204,
        effect=lambda w, t: w.row(User, t.ctx) is None,
    ),
    Case("api.user_tokens", "GET", "admin", api_admin(200), path("/api/users/{w.admin_id}/tokens")),
    Case(
        "api.token_revoke",
        "POST",
        "admin",
        api_admin(200),
        _user_token_target("/api/tokens/{id}/revoke"),
        ok=200,
        effect=lambda w, t: w.row(ApiToken, t.ctx).revoked_at is not None,
    ),
    # --- admin plane: Prometheus metrics (an API token of any role, or a session) ---
    Case("metrics.scrape", "GET", "admin", API_READ, path("/metrics")),
    # --- agent plane ---
    Case("agentlink.download", "GET", "agent", agent_only(200), path("/agent/download/current")),
    Case("agentlink.install_script", "GET", "agent", PUBLIC, path("/agent/install.sh")),
    Case("agentlink.unit_file", "GET", "agent", PUBLIC, path("/agent/restic-manager-agent.service")),
    Case("agentlink.health", "GET", "agent", PUBLIC, path("/agent/health")),
    Case(
        "agentlink.agent_socket",
        "GET",
        "agent",
        expect(400, 400, 400, 400, 400, 400),
        path("/ws/agent"),
        note="a WebSocket rule: routing refuses a plain GET (400) before the token check runs",
    ),
    Case(
        "agentlink.agent_socket",
        WS_HANDSHAKE,
        "agent",
        agent_only(101),
        path("/ws/agent"),
        note="the upgrade handshake: 101 only with an agent token, 401 before the handshake otherwise",
    ),
]
# fmt: on


# --- principals --------------------------------------------------------------------------------

_META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
_FORM_CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


class Principal:
    def __init__(self, name: str, world: World, username: str | None = None):
        self.name = name
        self.http = requests.Session()
        self.headers: dict[str, str] = {}
        admin = world.live.admin_url
        if name in BEARER_PRINCIPALS:
            token = world.agent_token if name == "agent_token" else world.tokens[name]
            self.headers["Authorization"] = f"Bearer {token}"
            return
        page = self.http.get(admin + "/login", timeout=10)
        if name in ("viewer", "admin"):
            form_token = _FORM_CSRF.search(page.text).group(1)
            r = self.http.post(
                admin + "/login",
                data={"username": username or name, "password": f"{name}-pass-123", "csrf_token": form_token},
                allow_redirects=False,
                timeout=10,
            )
            assert r.status_code == 302, f"{name} could not log in: {r.status_code}"
            page = self.http.get(admin + "/", timeout=10)
            assert page.status_code == 200
        self.headers["X-CSRFToken"] = _META_CSRF.search(page.text).group(1)

    def send(self, base: str, method: str, target: Target) -> requests.Response:
        if self.name in BEARER_PRINCIPALS:
            self.http.cookies.clear()  # a script: never a cookie, whatever a response set
        headers = dict(self.headers)
        if method == WS_HANDSHAKE:
            headers.update(
                {
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                }
            )
            method = "GET"
        resp = self.http.request(
            method,
            base + target.path,
            data=target.form,
            json=target.json,
            headers=headers,
            allow_redirects=False,
            timeout=15,
            stream=True,
        )
        if resp.status_code != 101:
            resp.content  # noqa: B018 - read the body so the connection is reusable
        resp.close()
        return resp


@pytest.fixture(scope="module")
def world(module_app):
    w = World(module_app)
    w.start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def principals(world):
    return {name: Principal(name, world) for name in PRINCIPALS}


# --- the tests ---------------------------------------------------------------------------------


def _route_keys(app) -> set[tuple[str, str]]:
    return {
        (rule.endpoint, method) for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}
    }


def test_every_route_has_an_rbac_expectation(module_app):
    table = {c.key for c in MATRIX if c.method != WS_HANDSHAKE}
    assert len(table) == len([c for c in MATRIX if c.method != WS_HANDSHAKE]), "duplicate rows in MATRIX"
    routes = _route_keys(module_app)
    missing = sorted(routes - table)
    stale = sorted(table - routes)
    assert not missing, "\n".join(f"route {e} {m} has no RBAC expectation" for e, m in missing)
    assert not stale, "\n".join(f"MATRIX row {e} {m} names no route" for e, m in stale)


def test_each_row_declares_the_plane_the_middleware_serves_it_on(module_app):
    rules = {rule.endpoint: rule.rule for rule in module_app.url_map.iter_rules()}
    for case in MATRIX:
        on_agent_plane = rules[case.endpoint].startswith(AGENT_PLANE_PREFIXES)
        assert case.plane == ("agent" if on_agent_plane else "admin"), case.key
        assert set(case.expect) == set(PRINCIPALS), case.key
        if case.effect is not None:
            assert case.ok is not None and case.ok in case.expect.values(), case.key


def _matches(resp: requests.Response, exp: Expect) -> bool:
    if isinstance(exp, Redirect):
        return resp.status_code == exp.status and urlsplit(resp.headers.get("Location", "")).path == exp.path
    return resp.status_code == exp


def _shape_problems(case: Case, resp: requests.Response) -> list[str]:
    """The JSON error shape where the contract promises one."""
    status = resp.status_code
    wants_json = case.target.__name__ != "_login_target" and (
        case.plane == "agent" or resp.request.path_url.startswith("/api")
    )
    if status not in (401, 403) or not wants_json:
        return []
    try:
        code = resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return [f"{status} without the JSON error shape: {resp.text[:120]!r}"]
    allowed = {401: {"unauthorized", "missing_token", "invalid_token"}, 403: {"forbidden"}}[status]
    return [] if code in allowed else [f"{status} with error code {code!r}"]


def _describe(resp: requests.Response) -> str:
    loc = resp.headers.get("Location")
    return f"{resp.status_code}" + (f"->{urlsplit(loc).path}" if loc else "")


@pytest.mark.parametrize("case", MATRIX, ids=[f"{c.endpoint} {c.method}" for c in MATRIX])
def test_rbac_matrix(case, world, principals):
    wrong_plane = "agent" if case.plane == "admin" else "admin"
    problems = []
    for name in PRINCIPALS:
        who = principals[name]
        if case.fresh_principal:
            # A throwaway account of the same role: logging out ends every session of its user,
            # and the shared principals must stay logged in.
            user = world.username(world.new_user(name)) if name in ("viewer", "admin") else None
            who = Principal(name, world, user)
        target = case.target(world)

        # The other plane never serves this route, for anybody, and nothing happens.
        resp = who.send(world.base(wrong_plane), case.method, target)
        if resp.status_code != 404 or resp.json().get("error", {}).get("code") != "not_found":
            problems.append(f"{name}: on the {wrong_plane} plane got {_describe(resp)}, expected 404 not_found")
        if case.effect is not None and case.effect(world, target):
            problems.append(f"{name}: the {wrong_plane}-plane request had an effect")

        resp = who.send(world.base(case.plane), case.method, target)
        exp = case.expect[name]
        if not _matches(resp, exp):
            problems.append(f"{name}: got {_describe(resp)}, expected {exp}  ({resp.text[:100]!r})")
        problems += [f"{name}: {p}" for p in _shape_problems(case, resp)]
        if case.effect is not None:
            allowed = exp == case.ok
            happened = case.effect(world, target)
            if happened != allowed:
                problems.append(f"{name}: side effect {'happened' if happened else 'missing'} (allowed={allowed})")
    assert not problems, f"{case.endpoint} {case.method} ({case.note or case.plane}):\n" + "\n".join(problems)
