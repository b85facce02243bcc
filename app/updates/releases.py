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


def read_signature(path: str) -> str | None:
    """Return the detached signature stored beside an artifact (``<artifact>.sig``), if any."""
    try:
        with open(path + ".sig") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def register(path: str, version: str, platform: str | None = None, signature: str | None = None) -> AgentRelease:
    """Record the artifact at ``path`` as the release for (version, platform), replacing an older record.

    The signature defaults to the ``<artifact>.sig`` file beside it: releases are signed where the
    release key lives (ideally offline), never necessarily on this server.
    """
    platform = platform or platform_tag()
    path = os.path.abspath(path)
    signature = signature or read_signature(path)
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


def signing_key() -> bytes | None:
    """The release signing key, when this server is configured to sign (dev and demo set-ups)."""
    path = current_app.config.get("RELEASE_SIGNING_KEY")
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def public_key() -> str | None:
    """The release public key agents should pin: ``RM_RELEASE_PUBLIC_KEY``, or derived from the signing key."""
    configured = current_app.config.get("RELEASE_PUBLIC_KEY")
    if configured:
        return configured
    key = signing_key()
    if key is None:
        return None
    from agent.signing import public_key_from_private

    return public_key_from_private(key)


def sign_file(path: str, version: str, platform: str, key: bytes) -> str:
    """Sign the artifact's manifest and write ``<artifact>.sig``; return the signature."""
    from agent.signing import manifest_bytes, sign

    sig = sign(key, manifest_bytes(version, platform, os.path.getsize(path), sha256_of(path)))
    with open(path + ".sig", "w") as f:
        f.write(sig + "\n")
    return sig


def ensure_current_release() -> AgentRelease:
    """Build (and sign, when a key is configured) the artifact for the server's own version if missing."""
    version = current_app.config["SERVER_VERSION"]
    key = signing_key()
    rel = find(version)
    if rel is not None and os.path.isfile(rel.path) and os.path.getsize(rel.path) == rel.size:
        if key and not rel.signature:
            return register(rel.path, version, rel.platform, sign_file(rel.path, version, rel.platform, key))
        return rel
    from agent.build import build_agent

    out = current_app.config["RELEASES_DIR"]
    log.info("building agent release %s into %s", version, out)
    built = build_agent(version, out)
    signature = sign_file(built.path, version, built.platform, key) if key else None
    return register(built.path, version, built.platform, signature)


def current_release() -> AgentRelease | None:
    """Return the registered release for the server's version, if its file is in place."""
    return kept_release(current_app.config["SERVER_VERSION"])


def kept_release(version: str, platform: str | None = None) -> AgentRelease | None:
    """The registered release of ``version`` whose file is still in place (what a revert needs).

    Releases are never deleted by the server: registering a new version leaves the older ones in
    ``agent_releases`` and ``RELEASES_DIR``, so a rollout can take hosts back to what they ran.
    """
    rel = find(version, platform)
    if rel is None or not os.path.isfile(rel.path):
        return None
    return rel


def download_path(release: AgentRelease) -> str:
    """Return the agent-plane path an agent fetches ``release`` from (resolved against its server URL)."""
    return f"/agent/download/{release.version}?platform={release.platform}"
