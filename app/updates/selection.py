"""Which hosts a rollout considers: the selector of ``POST /api/fleet/plan`` and ``/api/fleet/update``.

A :class:`Selector` is the targeting part of a rollout's request body (docs/updates.md,
"Targeting")::

    {"labels": {"env": "prod"},      every label must match (key and value, case-sensitive)
     "os": "linux", "arch": "x86_64", what the agent reported in its hello (exact match)
     "older_than": "1.4.0",          only agents running a version that sorts before 1.4.0
     "host_ids": [7, 3, 9],          only these hosts, in this order
     "exclude_host_ids": [3]}        never these hosts

Every field is optional; ``{}`` is today's default, every host by name. ``"version": "behind"``
may be given and is the default: a rollout always updates hosts to the server's version, so a
host that is not behind it is left out of the plan (``already_at_target``), whatever else the
selector says.

:meth:`Selector.select` answers the candidates in order plus the hosts the selector itself leaves
out with a reason the plan shows: ``excluded`` (named in ``exclude_host_ids``) and, for hosts named
in ``host_ids`` only, ``not_selected`` (the host does not match the selector's other criteria).
Hosts of the whole fleet that do not match are simply not candidates: listing hundreds of them
would bury the plan.

The stored form (``fleet_updates.selector``) is :meth:`Selector.to_dict`, which
:meth:`Selector.from_body` reads back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlalchemy as sa

from agent.version import compare_versions, version_key

from .. import labels as host_labels
from ..errors import Refusal
from ..extensions import db
from ..inputs import MAX_ID, is_id
from ..models import Host

INVALID = "invalid_selector"
#: The body fields a selector reads; the rest of a rollout's body (its strategy) is not its business.
FIELDS = ("labels", "os", "arch", "version", "older_than", "host_ids", "exclude_host_ids")
#: ``version`` values: only the default today (``older_than`` narrows it).
VERSION_CHOICES = ("behind",)
#: ``older_than``: a version in PEP 440's normal form (what setuptools-scm writes), as docs/openapi.json says.
VERSION_RE = re.compile(
    r"[0-9]{1,9}(?:\.[0-9]{1,9})*(?:(?:a|b|rc)[0-9]{1,9})?(?:\.post[0-9]{1,9})?(?:\.dev[0-9]{1,9})?"
    r"(?:\+[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*)?"
)

#: Why the selector leaves a host out (``LeftOut.reason`` in the plan).
EXCLUDED = "excluded"
NOT_SELECTED = "not_selected"


#: ``os`` and ``arch``: what agents report (``linux``, ``x86_64``, ``AMD64``), as docs/openapi.json says.
PLATFORM_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}")


def _platform(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not PLATFORM_RE.fullmatch(value):
        raise Refusal(400, INVALID, f"{name} must be 1 to 64 letters, digits, '.', '_', '+' or '-' (e.g. linux)")
    return value


def _ids(body: dict, name: str, allow_empty: bool) -> tuple[int, ...] | None:
    # A malformed list is the caller's mistake (400); well-formed ids of no host are 422 (select).
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or (not value and not allow_empty) or not all(is_id(i) for i in value):
        raise Refusal(400, "invalid_host_ids", f"{name} must list host ids (1 to {MAX_ID})")
    if len(set(value)) != len(value):
        raise Refusal(400, "invalid_host_ids", f"{name} lists a host more than once")
    return tuple(value)


@dataclass(frozen=True)
class Selector:
    labels: dict = field(default_factory=dict)
    os: str | None = None
    arch: str | None = None
    older_than: str | None = None
    host_ids: tuple[int, ...] | None = None
    exclude_host_ids: tuple[int, ...] = ()

    @classmethod
    def from_body(cls, body: dict | None) -> Selector:
        """The selector of a request body (or of a stored ``to_dict()``); 400 on a bad field.

        Codes: ``invalid_labels`` (label syntax, see :mod:`app.labels`), ``invalid_host_ids``
        (``host_ids`` / ``exclude_host_ids`` not a list of ids, or an id twice), and
        ``invalid_selector`` for the rest (``os``, ``arch``, ``version``, ``older_than``).
        Fields that are not the selector's are ignored.
        """
        body = body or {}
        if not isinstance(body, dict):
            raise Refusal(400, INVALID, "the selector must be a JSON object")
        labels = body.get("labels")
        labels = {} if labels is None else host_labels.validate(labels, "labels")
        version = body.get("version")
        if version is not None and version not in VERSION_CHOICES:
            raise Refusal(400, INVALID, 'version must be "behind" (the default); use older_than to select older agents')
        older_than = body.get("older_than")
        if older_than is not None and not isinstance(older_than, str):
            raise Refusal(400, INVALID, "older_than must be a version such as 1.4.0")
        if older_than is not None and (not VERSION_RE.fullmatch(older_than) or version_key(older_than) is None):
            raise Refusal(400, INVALID, f"older_than must be a version such as 1.4.0 or 2.0.0rc1, not {older_than!r}")
        return cls(
            labels=labels,
            os=_platform(body, "os"),
            arch=_platform(body, "arch"),
            older_than=older_than,
            host_ids=_ids(body, "host_ids", allow_empty=False),
            exclude_host_ids=_ids(body, "exclude_host_ids", allow_empty=True) or (),
        )

    def to_dict(self) -> dict:
        """The fields that narrow the selection (``{}`` selects every host): what the rollout stores."""
        out: dict = {}
        if self.labels:
            out["labels"] = dict(self.labels)
        for name in ("os", "arch", "older_than"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.host_ids is not None:
            out["host_ids"] = list(self.host_ids)
        if self.exclude_host_ids:
            out["exclude_host_ids"] = list(self.exclude_host_ids)
        return out

    @property
    def explicit(self) -> bool:
        """True when the caller named the hosts (``host_ids``)."""
        return self.host_ids is not None

    def describe(self) -> str:
        """The criteria in a few words (``labels env=prod, os linux``), or ``every host``."""
        parts = []
        if self.labels:
            parts.append(f"labels {host_labels.format_pairs(self.labels)}")
        if self.os is not None:
            parts.append(f"os {self.os}")
        if self.arch is not None:
            parts.append(f"arch {self.arch}")
        if self.older_than is not None:
            parts.append(f"older than {self.older_than}")
        if self.host_ids is not None:
            parts.append(f"{len(self.host_ids)} named host(s)")
        if self.exclude_host_ids:
            parts.append(f"excluding {len(self.exclude_host_ids)} host(s)")
        return ", ".join(parts) or "every host"

    # --- matching ---------------------------------------------------------------------------------

    def mismatch(self, host: Host) -> str | None:
        """Why ``host`` does not match the criteria (``None`` when it does); exclusions aside."""
        if not host.matches_labels(self.labels):
            have = host_labels.format_pairs(host.labels) or "none"
            return f"host {host.name} lacks the labels {host_labels.format_pairs(self.labels)} (it has {have})"
        if self.os is not None and host.os != self.os:
            return f"host {host.name} runs {host.os or 'an unknown OS'}, not {self.os}"
        if self.arch is not None and host.arch != self.arch:
            return f"host {host.name} is {host.arch or 'of an unknown architecture'}, not {self.arch}"
        if self.older_than is not None:
            if not host.agent_version:
                return f"host {host.name} has never reported a version, so it is not older than {self.older_than}"
            if compare_versions(host.agent_version, self.older_than) >= 0:
                return f"host {host.name} runs {host.agent_version}, not older than {self.older_than}"
        return None

    def _narrowed(self) -> sa.Select:
        """The fleet-wide query, narrowed in SQL by every criterion SQL can check portably."""
        q = sa.select(Host)
        if self.os is not None:
            q = q.where(Host.os == self.os)
        if self.arch is not None:
            q = q.where(Host.arch == self.arch)
        # Labels by JSON path (SQLite and PostgreSQL alike); mismatch() checks again in Python.
        q = q.where(*host_labels.narrowing(Host.labels, self.labels))
        if self.older_than is not None:
            q = q.where(Host.agent_version.is_not(None))
        if self.exclude_host_ids:
            q = q.where(Host.id.not_in(self.exclude_host_ids))
        return q.order_by(Host.name)

    def select(self) -> Selection:
        """The candidate hosts in order, and those the selector leaves out (with their reason).

        Named hosts (``host_ids``) keep the given order; otherwise every matching host, by name.
        A well-formed id of no host (in ``host_ids`` or ``exclude_host_ids``) is refused with 422
        ``unknown_host_ids``: a typo must not silently widen or narrow a rollout.
        """
        excluded = _existing(self.exclude_host_ids)
        out = Selection(left_out=[(h, EXCLUDED, f"host {h.name} is excluded (exclude_host_ids)") for h in excluded])
        if self.host_ids is None:
            out.hosts = [h for h in db.session.scalars(self._narrowed()) if self.mismatch(h) is None]
            return out
        skip = set(self.exclude_host_ids)
        for host in _existing(self.host_ids):
            if host.id in skip:
                continue
            why = self.mismatch(host)
            if why is None:
                out.hosts.append(host)
            else:
                out.left_out.append((host, NOT_SELECTED, why))
        return out


@dataclass
class Selection:
    """What a selector picked: ``hosts`` in rollout order, ``left_out`` as ``(host, reason, detail)``."""

    hosts: list[Host] = field(default_factory=list)
    left_out: list[tuple[Host, str, str]] = field(default_factory=list)


def _existing(ids: tuple[int, ...] | None) -> list[Host]:
    """The hosts of ``ids``, in that order; 422 ``unknown_host_ids`` naming any that do not exist."""
    if not ids:
        return []
    found = {h.id: h for h in db.session.scalars(sa.select(Host).where(Host.id.in_(ids)))}
    missing = [i for i in ids if i not in found]
    if missing:
        raise Refusal(422, "unknown_host_ids", f"no such host id(s): {', '.join(map(str, missing))}")
    return [found[i] for i in ids]
