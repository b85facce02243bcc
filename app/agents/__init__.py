"""The agent plane: the agent WebSocket, the artifact download and the install script.

Everything here is served only by the agent listener (werkzeug); the admin listener answers 404.
"""

from __future__ import annotations

import logging
import os

from flask import Blueprint, Response, abort, current_app, g, jsonify, request

from agent import protocol
from agent.resources import resource_path

from ..errors import error_response
from ..extensions import db, sock
from ..models import AgentRelease, Host
from ..runtime import runtime
from . import link
from .downloads import stream_file
from .server import mark_authenticated, pause

log = logging.getLogger(__name__)

bp = Blueprint("agentlink", __name__)

SCRIPTS_DIR = resource_path("agent", "scripts")


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _refuse(status: int, code: str, message: str):
    abort(error_response(status, code, message, realm="restic-manager-agent"))


@bp.before_request
def _authenticate_agent():
    """Refuse a bad agent token before the WebSocket handshake or the download starts."""
    if request.endpoint in ("agentlink.install_script", "agentlink.unit_file", "agentlink.health"):
        return None
    origin = request.headers.get("Origin")
    if origin and origin not in current_app.config["WS_ALLOWED_ORIGINS"]:
        _refuse(403, "origin_not_allowed", f"origin {origin!r} is not allowed on the agent plane")
    token = bearer_token()
    if not token:
        _refuse(401, "missing_token", "Authorization: Bearer <agent token> is required")
    found = Host.id_and_name_by_token(token)
    if found is None:
        _refuse(401, "invalid_token", "the agent token is unknown or revoked")
    mark_authenticated(request.environ)  # no longer a pending connection (app/agents/server.py)
    g.agent_host_id, g.agent_host_name = found
    db.session.close()  # don't hold a pooled connection for the lifetime of a socket
    return None


@bp.errorhandler(BrokenPipeError)
@bp.errorhandler(ConnectionResetError)
@bp.errorhandler(ConnectionAbortedError)
def _agent_hung_up(exc: ConnectionError):
    """The agent closed its socket mid-request: in a reconnect storm, one that gave up (its connect
    timeout) while the server was still writing the 101 or a download. Nobody is left to answer,
    and it is the agent's choice, not a server fault: one INFO line, no traceback."""
    log.info("agent %s hung up during %s %s (%s)", request.remote_addr, request.method, request.path, exc)
    db.session.rollback()
    return Response(status=499)  # nginx's "client closed request": never seen by the agent


@sock.route("/ws/agent", bp=bp)
def agent_socket(ws):
    link.serve_connection(ws, g.agent_host_id, request.remote_addr or "")


@bp.route("/agent/download/<version>")
def download(version: str):
    platform = request.args.get("platform", "py3-any")
    if version == "current":
        version = current_app.config["SERVER_VERSION"]
    release = None
    if "\x00" not in version and "\x00" not in platform:  # PostgreSQL cannot compare text with NUL
        release = db.session.scalar(
            db.select(AgentRelease).where(AgentRelease.version == version, AgentRelease.platform == platform)
        )
    db.session.close()
    pause(request.environ)  # a download is I/O, not handshake work: free the turn (app/agents/server.py)
    if release is None or not os.path.isfile(release.path):
        abort(error_response(404, "release_not_found", f"no agent release {version} for platform {platform}"))
    # Every download is registered for its host and checked between chunks, so revoking or
    # deleting the host cuts it at once (app/agents/downloads.py); throttled when configured.
    stream = stream_file(
        runtime().downloads,
        g.agent_host_id,
        release.path,
        sock=request.environ.get("werkzeug.socket"),
        bytes_per_s=current_app.config["DOWNLOAD_RATE_KIB"] * 1024,
    )
    resp = Response(stream, mimetype="application/octet-stream")
    resp.headers["Content-Length"] = str(release.size)
    resp.headers["Content-Disposition"] = f'attachment; filename="restic-manager-agent-{release.version}.pyz"'
    resp.headers["Cache-Control"] = "no-cache"
    resp.set_etag(release.sha256)
    resp.headers["X-Checksum-Sha256"] = release.sha256
    from ..updates.releases import public_key

    key = public_key()
    if key:
        resp.headers["X-Release-Public-Key"] = key
    resp.headers["X-Agent-Version"] = release.version
    if release.signature:
        resp.headers["X-Agent-Signature"] = release.signature
    return resp


def _script(relpath: str, mimetype: str) -> Response:
    with open(os.path.join(SCRIPTS_DIR, relpath), "rb") as f:
        return Response(f.read(), mimetype=mimetype)


@bp.route("/agent/install.sh")
def install_script():
    return _script("install-agent.sh", "text/x-shellscript")


@bp.route("/agent/restic-manager-agent.service")
def unit_file():
    return _script("systemd/restic-manager-agent.service", "text/plain")


@bp.route("/agent/health")
def health():
    return jsonify({"ok": True, "server_version": current_app.config["SERVER_VERSION"]})


__all__ = ["bp", "protocol"]
