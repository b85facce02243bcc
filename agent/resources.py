"""Where the product's top-level folders are at run time.

A checkout keeps ``templates/``, ``migrations/`` and ``scripts/`` at its top; the wheel carries
them inside the packages (``app/templates``, ``app/migrations``, ``agent/scripts``: setup.cfg's
``package_dir``). :func:`resource_path` looks inside the imported package first, so an installed
server never reads a source tree, and falls back to the checkout's top level beside the package.
"""

from __future__ import annotations

import importlib.util
import os


def resource_path(package: str, *parts: str) -> str:
    """Return the path of ``parts`` shipped with ``package`` (``"app"`` or ``"agent"``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not an importable package")
    package_dir = os.path.abspath(list(spec.submodule_search_locations)[0])
    inside = os.path.join(package_dir, *parts)
    if os.path.exists(inside):
        return inside
    return os.path.join(os.path.dirname(package_dir), *parts)
