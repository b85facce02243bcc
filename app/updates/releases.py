"""Agent release artifacts: built, registered in ``agent_releases``, served on the agent plane."""

from __future__ import annotations

import hashlib
import logging
import os

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from agent import platform_tag

from ..extensions import db
from ..models import AgentRelease

log = logging.getLogger(__name__)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find(version: str, platform: str | None = None) -> AgentRelease | None:
    platform = platform or platform_tag()
    return db.session.scalar(
        sa.select(AgentRelease).where(AgentRelease.version == version, AgentRelease.platform == platform)
    )


def register(path: str, version: str, platform: str | None = None, signature: str | None = None) -> AgentRelease:
    """Record the artifact at ``path`` as the release for (version, platform), replacing an older record."""
    platform = platform or platform_tag()
    path = os.path.abspath(path)
    digest, size = sha256_of(path), os.path.getsize(path)
    rel = find(version, platform)
    if rel is None:
        rel = AgentRelease(version=version, platform=platform)
        db.session.add(rel)
    rel.sha256, rel.size, rel.path, rel.signature = digest, size, path, signature
    try:
        db.session.commit()
    except IntegrityError:
        # Another thread registered the same release first; theirs is equally good.
        db.session.rollback()
        rel = find(version, platform)
    return rel


def ensure_current_release() -> AgentRelease:
    """Build and register the artifact for the server's own version if it is missing."""
    version = current_app.config["SERVER_VERSION"]
    rel = find(version)
    if rel is not None and os.path.isfile(rel.path) and os.path.getsize(rel.path) == rel.size:
        return rel
    from agent.build import build_agent

    out = current_app.config["RELEASES_DIR"]
    log.info("building agent release %s into %s", version, out)
    built = build_agent(version, out)
    return register(built.path, version, built.platform)


def current_release() -> AgentRelease | None:
    """Return the registered release for the server's version, if its file is in place."""
    rel = find(current_app.config["SERVER_VERSION"])
    if rel is None or not os.path.isfile(rel.path):
        return None
    return rel


def download_path(release: AgentRelease) -> str:
    """Return the agent-plane path an agent fetches ``release`` from (resolved against its server URL)."""
    return f"/agent/download/{release.version}?platform={release.platform}"
