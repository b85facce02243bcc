"""The one version string shared by server and agent, and how two versions compare."""

from __future__ import annotations

from agent.version import compare_versions, get_version


def server_version(config) -> str:
    """Return the version this server claims: ``RM_VERSION`` if set, else the build's."""
    return config.get("VERSION") or get_version()


def is_newer(a: str, b: str) -> bool:
    """Return True when version ``a`` sorts after ``b`` (PEP 440; plain string order otherwise).

    The agent's comparison, so that server and agent agree on what a downgrade is.
    """
    return compare_versions(a, b) > 0
