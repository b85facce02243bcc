"""Fleet revert: take the hosts a rollout updated back to the version each of them ran before.

A revert is a rollout of its own (``kind = "revert"``, ``parent_id`` the rollout it reverts): its
rows carry each host's own ``target_version`` (the row's ``from_version`` in the parent), it
dispatches through the allow-downgrade path to the releases the server kept
(:func:`releases.kept_release`), and it follows the same halt rules and strategy as its parent.
It is refused up front, before anything moves, when a version it needs is no longer on the server
(or, with a release key configured, is not signed: every agent would refuse it).

``revert_on_halt`` starts one by itself once a halted rollout's in-flight hosts have finished
(:func:`start_due`, from the fleet tick), so it is as restart-safe as the rollout itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa

from ..errors import Refusal
from ..extensions import db
from ..models import Alert, AuditEvent, FleetUpdate, FleetUpdateHost
from ..timeutil import utcnow
from . import releases
from .strategy import Strategy, assign_waves

log = logging.getLogger(__name__)

#: A rollout can be reverted once it stopped moving.
REVERTIBLE_STATUSES = ("succeeded", "halted", "cancelled")
REVERT_ALERT = "fleet-revert"


@dataclass(frozen=True)
class RevertHost:
    row: FleetUpdateHost  # the parent's row of a host it updated
    version: str  # what the host ran before: the revert's target for it


def _from_version(row: FleetUpdateHost) -> str | None:
    if row.from_version:
        return row.from_version
    return ((row.job.params or {}) if row.job is not None else {}).get("from_version")


def _target_of(row: FleetUpdateHost) -> str:
    return row.target_version or row.fleet_update.target_version


def updated_hosts(fu: FleetUpdate) -> list[RevertHost]:
    """The hosts ``fu`` updated (its succeeded rows of hosts that still exist), in its order."""
    out = []
    for row in fu.hosts:
        before = _from_version(row)
        if row.status != "succeeded" or row.host is None or before is None or before == _target_of(row):
            continue
        out.append(RevertHost(row, before))
    return out


def _refuse_missing_releases(hosts: list[RevertHost]) -> None:
    signed_only = releases.public_key() is not None
    missing: dict[str, list[str]] = {}
    unsigned: dict[str, list[str]] = {}
    for h in hosts:
        rel = releases.kept_release(h.version)
        if rel is None:
            missing.setdefault(h.version, []).append(h.row.name)
        elif signed_only and not rel.signature:
            unsigned.setdefault(h.version, []).append(h.row.name)
    if not (missing or unsigned):
        return

    def listing(found: dict[str, list[str]]) -> str:
        return "; ".join(f"{v} (for {', '.join(names)})" for v, names in sorted(found.items()))

    parts = []
    if missing:
        parts.append(f"the server no longer has the agent release {listing(missing)}")
    if unsigned:
        parts.append(f"the agent release {listing(unsigned)} is not signed, so the agents would refuse it")
    raise Refusal(
        409,
        "revert_release_unavailable",
        "cannot revert: " + " and ".join(parts) + "; register the release again (restic-manager releases add)",
    )


def check(fu: FleetUpdate | None, fleet_id: int) -> list[RevertHost]:
    """The hosts a revert of ``fu`` would take back, or the :class:`Refusal` that says why not."""
    if fu is None:
        raise Refusal(404, "fleet_update_not_found", f"no fleet update with id {fleet_id}")
    if fu.status not in REVERTIBLE_STATUSES:
        raise Refusal(
            409,
            "fleet_update_not_finished",
            f"fleet update {fu.id} is {fu.status}: only a finished one can be reverted",
        )
    if fu.kind == "revert":
        raise Refusal(409, "fleet_update_is_a_revert", f"fleet update {fu.id} is itself a revert; start an update")
    if db.session.scalar(
        sa.select(FleetUpdate.id).where(
            FleetUpdate.parent_id == fu.id,
            FleetUpdate.kind == "revert",
            FleetUpdate.status.in_(("scheduled", "running")),
        )
    ):
        raise Refusal(409, "fleet_update_running", f"a revert of fleet update {fu.id} is already under way")
    if db.session.scalar(
        sa.select(FleetUpdateHost.id)
        .where(FleetUpdateHost.fleet_update_id == fu.id, FleetUpdateHost.status == "running")
        .limit(1)
    ):
        raise Refusal(409, "fleet_update_not_finished", f"fleet update {fu.id} still has hosts updating; wait for them")
    hosts = updated_hosts(fu)
    if not hosts:
        raise Refusal(422, "nothing_to_revert", f"fleet update {fu.id} updated no host that still exists")
    _refuse_missing_releases(hosts)
    return hosts


def start(fleet_id: int, actor: str) -> FleetUpdate:
    """Start a revert of rollout ``fleet_id`` (a rollout of its own, audited); raise :class:`Refusal`."""
    from . import fleet

    parent = db.session.get(FleetUpdate, fleet_id)
    hosts = check(parent, fleet_id)
    strategy = Strategy.of(parent)
    waves = assign_waves(len(hosts), strategy)
    the_plan = fleet.Plan(
        target_version=Counter(h.version for h in hosts).most_common(1)[0][0],
        strategy=strategy,
        hosts=[fleet.PlannedHost(h.row.host, position=i, wave=waves[i]) for i, h in enumerate(hosts)],
    )
    fu = fleet.create(
        actor, the_plan, kind="revert", parent_id=parent.id, targets={h.row.host_id: h.version for h in hosts}
    )
    log.info("fleet update %s reverts %s over %d hosts", fu.id, parent.id, len(hosts))
    return fu


def start_due() -> bool:
    """Start the revert of a halted ``revert_on_halt`` rollout once its in-flight hosts finished.

    Called from the fleet tick. The flag is cleared in the same transaction that starts the revert
    (or records why it could not start), so a restart neither loses nor repeats it.
    """
    due = db.session.scalars(
        sa.select(FleetUpdate).where(FleetUpdate.status == "halted", FleetUpdate.revert_on_halt.is_(True))
    ).all()
    moved = False
    for parent in due:
        try:
            check(parent, parent.id)
        except Refusal as refusal:
            if refusal.code == "fleet_update_not_finished":
                continue  # in-flight hosts first; their job ends wake the tick again
            db.session.rollback()
            _give_up(parent, refusal)
            moved = True
            continue
        if db.session.scalar(sa.select(FleetUpdate.id).where(FleetUpdate.status == "running")):
            continue  # another rollout holds the slot (started by hand since); try again later
        parent.revert_on_halt = False
        try:
            start(parent.id, "system")
        except Refusal as refusal:
            db.session.rollback()
            _give_up(parent, refusal)
        moved = True
    return moved


def _give_up(parent: FleetUpdate, refusal: Refusal) -> None:
    parent = db.session.get(FleetUpdate, parent.id)
    parent.revert_on_halt = False
    AuditEvent.record("system", "fleet.revert_refused", f"fleet_update:{parent.id}", reason=refusal.message)
    Alert.raise_or_touch(
        "fleet_update_halted",
        f"{REVERT_ALERT}:{parent.id}",
        f"Fleet update {parent.id} halted and could not be reverted: {refusal.message}",
    )
    db.session.commit()
    log.warning("fleet update %s: automatic revert refused: %s (at %s)", parent.id, refusal.message, utcnow())
