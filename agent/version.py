"""The agent's version string: one source shared with the server."""

from __future__ import annotations

import re

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


# --------------------------------------------------------------------------- ordering
# PEP 440 ordering in the standard library (the agent cannot depend on ``packaging``); the server
# uses the same function, so both sides agree on what "older" means.

_PEP440 = re.compile(
    r"""
    ^\s*v?
    (?:(?P<epoch>[0-9]+)!)?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?P<pre>[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?P<post>(?:-(?P<post_n1>[0-9]+))|(?:[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?))?
    (?P<dev>[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*$
    """,
    re.VERBOSE | re.IGNORECASE,
)
_PRE_ORDER = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def version_key(version: str) -> tuple | None:
    """Return a sort key with PEP 440's order for ``version``, or None if it is not PEP 440."""
    if not isinstance(version, str):
        return None
    m = _PEP440.match(version)
    if m is None:
        return None
    epoch = int(m.group("epoch") or 0)
    release = [int(part) for part in m.group("release").split(".")]
    while len(release) > 1 and release[-1] == 0:  # 1.0 == 1.0.0
        release.pop()
    has_pre, has_post, has_dev = m.group("pre") is not None, m.group("post") is not None, m.group("dev") is not None
    if has_pre:
        pre: tuple = (_PRE_ORDER[m.group("pre_l").lower()], int(m.group("pre_n") or 0))
    elif has_dev and not has_post:
        pre = (-1, 0)  # 1.0.dev1 sorts before 1.0a1
    else:
        pre = (3, 0)  # a final release sorts after its pre-releases
    post = int(m.group("post_n1") or m.group("post_n2") or 0) if has_post else -1
    dev = (0, int(m.group("dev_n") or 0)) if has_dev else (1, 0)
    local: tuple = ()
    if m.group("local"):
        # numeric segments sort after alphanumeric ones, and any local label after none
        local = tuple(
            (1, int(seg), "") if seg.isdigit() else (0, 0, seg.lower()) for seg in re.split(r"[-_.]", m.group("local"))
        )
    return (epoch, tuple(release), pre, post, dev, local)


def compare_versions(a: str, b: str) -> int:
    """Return -1, 0 or 1 as ``a`` sorts before, equal to or after ``b``; never raises.

    PEP 440 order when both parse (so ``1.0 == 1.0.0`` and ``2.0rc1 < 2.0``); plain string order
    when either does not, which is what the server has always done.
    """
    try:
        ka, kb = version_key(a), version_key(b)
        if ka is not None and kb is not None:
            return (ka > kb) - (ka < kb)
        sa, sb = str(a), str(b)
        return (sa > sb) - (sa < sb)
    except Exception:  # total by contract: a comparison must never take the caller down
        return 0
