"""The restic-manager agent: a small service that keeps one host linked to the server.

It is stdlib plus simple-websocket only (no Flask, no requests), so it can be shipped as one
self-contained zipapp run by the host's ``python3``. Importing this package is cheap and has no
side effects: the server imports :mod:`agent.protocol` and :mod:`agent.version` from it.
"""

from __future__ import annotations

import os

__all__ = ["PLATFORM_PURE", "platform_tag", "program_path"]

#: The artifact is pure Python (vendored pure-Python dependencies only), so one build serves every
#: OS and architecture with a Python 3 interpreter. A native build would return e.g. "linux-x86_64".
PLATFORM_PURE = "py3-any"


def platform_tag() -> str:
    """Return the artifact platform this agent runs as (``py3-any`` while the zipapp is pure Python)."""
    return PLATFORM_PURE


def program_path() -> str | None:
    """Return the path of the zipapp file this agent runs from, or None when run from source."""
    # Inside a zipapp, __file__ is "<archive>.pyz/agent/__init__.py(c)": walk up to the archive.
    path = os.path.abspath(__file__)
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
        if os.path.isfile(path):
            import zipfile  # only here: keeps importing the package cheap for the server

            return path if zipfile.is_zipfile(path) else None
