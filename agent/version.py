"""The agent's version string: one source shared with the server."""

from __future__ import annotations

UNKNOWN = "0.0.0+unknown"


def get_version() -> str:
    """Return the version baked into the zipapp, else the installed package's, else ``0.0.0+unknown``."""
    try:  # written into the zipapp by agent.build; wins so an artifact always knows what it is
        from agent._build_version import VERSION

        return VERSION
    except ImportError:
        pass
    try:  # written by setuptools-scm when the package is installed from git
        from agent import _version

        return getattr(_version, "__version__", None) or _version.version
    except (ImportError, AttributeError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("restic-manager")
    except PackageNotFoundError:
        return UNKNOWN
