"""The hosts capability, shared by the pages, the JSON API and the CLI.

Enrol, revoke, delete, the install command and agent URLs, and the host reads (which hosts are
"behind", a host's jobs, the dashboard counts). Revoking or deleting a host touches the
database, the audit log and the live socket, so those operations live here once instead of in
each view. Nothing here reads ``request``; a refused operation raises :class:`~app.errors.Refusal`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from agent import protocol

from . import labels as host_labels
from .errors import Refusal
from .extensions import db
from .models import Alert, AuditEvent, Host, Job
from .runtime import runtime

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")  # \Z: "$" would let a trailing newline in
JOB_HISTORY_LIMIT = 20


NO_RELEASE_KEY_WARNING = (
    "no release key is configured (RM_RELEASE_PUBLIC_KEY), so the install command pins none and this "
    "agent will never be able to update itself. Set the key on the server (see `restic-manager release-key` "
    "and docs/security.md), then enrol the host or re-run the install command."
)


@dataclass
class Enrolment:
    host: Host
    token: str
    install_command: str
    #: Set when the install command pins no release key: its agent can never update itself.
    no_release_key_warning: str | None = None


def get(host_id: int) -> Host:
    """The host with this id; :class:`Refusal` 404 ``host_not_found`` (one wording everywhere) if none."""
    host = db.session.get(Host, host_id)
    if host is None:
        raise Refusal(404, "host_not_found", f"no host with id {host_id}")
    return host


def validate_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Refusal(400, "invalid_name", "host name must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return name


def agent_base_url(request_host: str | None = None) -> str:
    """The agent plane's public HTTP base: ``PUBLIC_AGENT_URL`` or derived from ``AGENT_ADDR``
    (``https://`` when the agent plane serves TLS itself)."""
    public = current_app.config.get("PUBLIC_AGENT_URL")
    if public:
        return public.rstrip("/")
    host, port = current_app.config["AGENT_ADDR"]
    if host in ("", "0.0.0.0", "::"):
        # Bound to every address: the name the admin reached us by is the best guess.
        host = (urlsplit("//" + request_host).hostname if request_host else None) or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if current_app.config.get("AGENT_TLS_CERT") else "http"
    return f"{scheme}://{host}:{port}"


def agent_ws_url(request_host: str | None = None) -> str:
    base = agent_base_url(request_host)
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :]
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :]
    return base


def install_command(token: str, request_host: str | None = None) -> str:
    base = agent_base_url(request_host)
    cmd = (
        f"curl -fsSL {shlex.quote(base + '/agent/install.sh')} | sudo sh -s -- "
        f"--server {shlex.quote(agent_ws_url(request_host))} --token {shlex.quote(token)}"
    )
    from .updates.releases import public_key

    key = public_key()
    return f"{cmd} --release-key {shlex.quote(key)}" if key else cmd


def enrol(name, actor: str, request_host: str | None = None, labels=None) -> Enrolment:
    """Create a host and audit ``host.enrolled`` in one transaction; the token is returned once.

    ``labels`` (a JSON object, checked: 400 ``invalid_labels``) are the host's from the start,
    recorded in the enrolment's audit event.
    """
    name = validate_name(name)
    labels = {} if labels is None else host_labels.validate(labels)
    if db.session.scalar(sa.select(Host.id).where(Host.name == name)) is not None:
        raise Refusal(409, "host_exists", f"a host named {name} already exists")
    host, token = Host.enrol(name)
    host.labels = labels
    try:
        db.session.flush()
        AuditEvent.record(actor, "host.enrolled", host.name, host_id=host.id, **({"labels": labels} if labels else {}))
        db.session.commit()
    except IntegrityError:
        db.session.rollback()  # a concurrent enrolment took the name between the check and the insert
        raise Refusal(409, "host_exists", f"a host named {name} already exists") from None
    return _enrolment(host, token, request_host)


def set_labels(host: Host, labels, actor: str) -> bool:
    """Replace the host's labels with ``labels`` (checked: 400 ``invalid_labels``) and commit.

    Audited ``host.labels_changed`` (old and new) when they change; return whether they did.
    """
    changed = host.set_labels(host_labels.validate(labels), actor)
    db.session.commit()
    return changed


def patch_labels(host: Host, patch, actor: str) -> bool:
    """Merge ``patch`` into the host's labels (RFC 7396: a null value removes the key) and commit."""
    return set_labels(host, host_labels.merged(host.labels, patch), actor)


#: The reason a running update ends with when its host's token is revoked or replaced / the host deleted.
REVOKED_REASON = "host token revoked"
DELETED_REASON = "host deleted"
REPLACED_REASON = "host token replaced"


def revoke(host: Host, actor: str) -> None:
    """Revoke the host's agent token; cut its live connection and downloads at once.

    A revoked host can neither download nor say hello again, so its running update can only
    fail: the watcher fails it now (``host_removed``), naming the revocation, not at its deadline.
    """
    host.revoke()
    AuditEvent.record(actor, "host.revoked", host.name, host_id=host.id)
    db.session.commit()
    # After the commit, so a reconnect racing the close is already refused by the token check.
    _cut_off(host.id, "token revoked", REVOKED_REASON, None)


def reissue_token(host: Host, actor: str, request_host: str | None = None) -> Enrolment:
    """Give the host a new agent token (shown once), replacing the old one and lifting a revocation.

    The old token stops working at the commit; a connection made with it is closed, so the agent
    must be reinstalled (or its config edited) with the new token. Audited ``host.token_reissued``.
    """
    was_revoked = host.revoked_at is not None
    token = host.rotate_token()
    AuditEvent.record(
        actor, "host.token_reissued", host.name, host_id=host.id, prefix=host.token_prefix, was_revoked=was_revoked
    )
    db.session.commit()
    # The old token can no longer download or say hello: an update it was running ends now too.
    _cut_off(host.id, "token replaced", REPLACED_REASON, None)
    return _enrolment(host, token, request_host)


def _enrolment(host: Host, token: str, request_host: str | None) -> Enrolment:
    """The token's answer: the install command, and a warning when it can pin no release key."""
    from .updates.releases import public_key

    warning = None if public_key() else NO_RELEASE_KEY_WARNING
    return Enrolment(host, token, install_command(token, request_host), warning)


def delete(host: Host, actor: str) -> None:
    """Delete the host; its job history stays (with the host's name), a running update ends ``cancelled``.

    The cancellation, its audit and the deletion are one transaction; then the live connection and
    any download in progress are cut.
    """
    host_id, name = host.id, host.name
    cancelled = Job.cancel_running(host_id, DELETED_REASON, actor)
    db.session.delete(host)
    AuditEvent.record(actor, "host.deleted", name, host_id=host_id)
    db.session.commit()
    _cut_off(host_id, DELETED_REASON, DELETED_REASON, cancelled)


def _cut_off(host_id: int, close_message: str, reason: str, cancelled_job: str | None) -> None:
    rt = runtime()
    rt.connections.close(host_id, protocol.CLOSE_REVOKED, close_message)
    rt.downloads.abort(host_id, reason)
    if rt.cluster is not None:  # the socket, or a download, may be on another instance
        rt.cluster.broadcast("cut", host_id, protocol.CLOSE_REVOKED, close_message)
    rt.host_removed.publish(host_id, reason, cancelled_job)


def ping(host: Host, timeout: float) -> tuple[bool, float | None]:
    """Round-trip a ``ping`` to the host's agent: (whether it is connected, seconds or None on no pong).

    With several instances the ping goes through the one holding the host's socket.
    """
    rt = runtime()
    conn = rt.connections.get(host.id)
    if conn is None:
        return rt.cluster.ping(host.id, timeout) if rt.cluster is not None else (False, None)
    db.session.close()  # don't hold a database connection while waiting on the network
    return True, conn.ping(timeout)


# --- reads shared by pages and API ----------------------------------------------------------


def behind_hosts() -> list[Host]:
    """The hosts an update would move: not revoked, and running an agent older than the server.

    The one definition of "behind" for counting: the dashboard count and the ``?updates=behind``
    filter (pages and API) use it. A revoked host cannot connect, so it can never be updated and
    is not counted (docs/updates.md). A rollout takes the behind hosts that can update now
    (``app.updates.fleet.plan``: not offline, with the ``update`` capability).
    """
    version = current_app.config["SERVER_VERSION"]
    hosts = db.session.scalars(sa.select(Host).where(Host.revoked_at.is_(None)).order_by(Host.name))
    return [h for h in hosts if h.version_state(version) == "behind"]


def list_hosts(updates: str | None = None, labels: dict | None = None) -> list[Host]:
    """All hosts by name; ``updates="behind"`` keeps only :func:`behind_hosts`, ``labels`` only
    the hosts carrying every one of them."""
    if updates == "behind":
        found = behind_hosts()
    else:
        q = sa.select(Host).where(*host_labels.narrowing(Host.labels, labels)).order_by(Host.name)
        found = list(db.session.scalars(q))
    return [h for h in found if h.matches_labels(labels or {})]


def jobs_for(host_id: int, limit: int = JOB_HISTORY_LIMIT) -> list[Job]:
    return list(
        db.session.scalars(
            sa.select(Job).where(Job.host_id == host_id).order_by(Job.created_at.desc(), Job.id).limit(limit)
        )
    )


def latest_update_job(host_id: int) -> Job | None:
    return db.session.scalar(
        sa.select(Job).where(Job.host_id == host_id, Job.kind == "update").order_by(Job.created_at.desc()).limit(1)
    )


def dashboard_counts() -> dict:
    return {
        "hosts_total": db.session.scalar(sa.select(sa.func.count(Host.id))),
        "hosts_online": db.session.scalar(sa.select(sa.func.count(Host.id)).where(Host.connected.is_(True))),
        "hosts_behind": len(behind_hosts()),
        "alerts_open": db.session.scalar(sa.select(sa.func.count(Alert.id)).where(Alert.resolved_at.is_(None))),
        "updates_running": db.session.scalar(
            sa.select(sa.func.count(Job.id)).where(Job.kind == "update", Job.status == "running")
        ),
    }
