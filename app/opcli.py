"""Operator commands: ``hosts list``, ``jobs show``, ``fleet plan|start|status|pause|resume|skip|cancel|retry``.

They call the functions the JSON API calls (:mod:`app.hosts`, :mod:`app.updates.fleet`), in
this process, on the same database; they never speak HTTP to the server. A rollout started here
is advanced by the running ``serve`` process's scheduler (its fleet tick, ``RM_FLEET_TICK_S``),
because only that process holds the agents' sockets; ``--follow`` watches the database.

Exit codes: 0 succeeded (or still running, for a status read), 1 failed, halted or cancelled
(or refused), 2 usage error (bad option, unknown host, job or rollout).

Like app/cli.py, this module imports only :mod:`click` at the top; each command imports what it
needs when it runs, so ``--help`` and usage errors never import Flask, SQLAlchemy or the models.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import click

from .cliapp import AppGroup, with_appcontext

if TYPE_CHECKING:
    from .errors import Refusal
    from .models import FleetUpdate

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

jobs_group = AppGroup("jobs", help="Inspect jobs (agent updates).")
fleet_group = AppGroup("fleet", help="Plan, start, watch, pause, resume, cancel and retry fleet rollouts.")


def _usage(message: str) -> click.exceptions.Exit:
    click.echo(f"Error: {message}", err=True)
    return click.exceptions.Exit(EXIT_USAGE)


def _refused(refusal: Refusal) -> click.exceptions.Exit:
    click.echo(f"Error: {refusal.message} ({refusal.code})", err=True)
    usage = refusal.code.startswith("invalid_") or refusal.code == "unknown_host_ids"
    return click.exceptions.Exit(EXIT_USAGE if usage else EXIT_FAILED)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _table(title: str | None, columns: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    return table


# --- hosts list --------------------------------------------------------------------------------


@click.command("list")
@click.option("--behind", is_flag=True, help="Only hosts whose agent is older than the server.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Only hosts with this label (repeat it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's host objects).")
@with_appcontext  # a command of the ``hosts`` group in app/cli.py, added there, not made by AppGroup.command
def hosts_list(behind, labels, as_json):
    """List enrolled hosts: version, state, online, labels, last seen."""
    from flask import current_app

    from .errors import Refusal
    from .hosts import list_hosts
    from .labels import format_pairs, parse_pairs

    version = current_app.config["SERVER_VERSION"]
    try:
        wanted = parse_pairs(labels, "the label filter")
    except Refusal as r:
        raise _refused(r) from None
    found = list_hosts("behind" if behind else None, wanted)
    if as_json:
        _echo_json({"server_version": version, "hosts": [h.to_dict(version) for h in found]})
        return
    rows = [
        [
            h.id,
            h.name,
            h.agent_version or "-",
            "revoked" if h.revoked_at is not None else h.version_state(version),
            "yes" if h.connected else "no",
            "update" if h.can_update() else "-",
            format_pairs(h.labels),
            h.last_seen.strftime("%Y-%m-%d %H:%M:%S") if h.last_seen else "never",
        ]
        for h in found
    ]
    cols = ["id", "name", "agent", "state", "online", "can", "labels", "last seen"]
    console = _console()
    console.print(f"{len(found)} host(s); server version {version}")
    console.print(_table(None, cols, rows))


# --- jobs show -----------------------------------------------------------------------------------


@jobs_group.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's job object).")
def jobs_show(job_id, as_json):
    """Show one job; exit 1 if it failed or was cancelled."""
    from .extensions import db
    from .models import Host, Job

    job = db.session.get(Job, job_id)
    if job is None:
        raise _usage(f"no job with id {job_id}")
    d = job.to_dict()
    if as_json:
        _echo_json({"job": d})
    else:
        host = db.session.get(Host, job.host_id) if job.host_id is not None else None
        for key, value in [("job", d["id"]), ("host", host.name if host else d["host_id"])] + [
            (k, d[k])
            for k in ("kind", "status", "phase", "from_version", "target_version", "actor", "error")
            + ("created_at", "updated_at", "finished_at", "deadline")
        ]:
            if value is not None:
                click.echo(f"{key + ':':<16}{value}")
    raise click.exceptions.Exit(EXIT_FAILED if job.status in ("failed", "cancelled") else EXIT_OK)


# --- fleet ---------------------------------------------------------------------------------------


def _host_ids(names: tuple[str, ...]) -> list[int] | None:
    """``--host`` values (names or ids, in order) as host ids; None when none were given."""
    if not names:
        return None
    import sqlalchemy as sa

    from .extensions import db
    from .models import Host

    ids = []
    for name in names:
        host = db.session.scalar(sa.select(Host).where(Host.name == name))
        if host is None and name.isdigit():
            host = db.session.get(Host, int(name))
        if host is None:
            raise _usage(f"no host named {name!r}")
        ids.append(host.id)
    return ids


def selector_body(labels, os_name, arch, older_than, hosts, excludes) -> dict:
    """The selector options as the API's request body (``labels``, ``os``, ... ``exclude_host_ids``)."""
    from .labels import parse_pairs

    body: dict = {}
    if labels:
        body["labels"] = parse_pairs(labels)
    for key, value in (("os", os_name), ("arch", arch), ("older_than", older_than)):
        if value is not None:
            body[key] = value
    if hosts:
        body["host_ids"] = _host_ids(hosts)
    if excludes:
        body["exclude_host_ids"] = _host_ids(excludes)
    return body


def _selector_options(command):
    """``--label --os --arch --older-than --host --exclude``: the rollout's selector (docs/updates.md)."""
    options = [
        click.option(
            "--label",
            "labels",
            multiple=True,
            metavar="KEY=VALUE",
            help="Only hosts with this label (repeat it: all must match).",
        ),
        click.option("--os", "os_name", metavar="OS", help="Only hosts whose agent reports this OS (e.g. linux)."),
        click.option("--arch", metavar="ARCH", help="Only hosts of this architecture (e.g. x86_64)."),
        click.option("--older-than", metavar="VERSION", help="Only hosts whose agent is older than VERSION."),
        click.option(
            "--host",
            "hosts",
            multiple=True,
            metavar="NAME",
            help="Roll over these hosts, in this order (repeat it); default: every host that can be updated.",
        ),
        click.option("--exclude", "excludes", multiple=True, metavar="NAME", help="Leave this host out (repeat it)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selector(labels, os_name, arch, older_than, hosts, excludes):
    from .errors import Refusal
    from .updates.selection import Selector

    try:
        return Selector.from_body(selector_body(labels, os_name, arch, older_than, hosts, excludes))
    except Refusal as r:
        raise _refused(r) from None


def _strategy_options(fn):
    """The rollout strategy options (docs/updates.md), as ``POST /api/fleet/update`` takes them."""
    options = [
        click.option("--canary", type=click.IntRange(0), help="Hosts that go first, alone (wave 0)."),
        click.option("--canary-soak", "canary_soak_s", type=float, metavar="SECONDS", help="Watch after the canary."),
        click.option("--max-in-flight", metavar="N|P%", help="Hosts updated at once, and the wave size (default 1)."),
        click.option("--max-failures", metavar="N|P%", help="Failed hosts tolerated; one more halts (default 0)."),
        click.option("--wave-soak", "wave_soak_s", type=float, metavar="SECONDS", help="Pause between waves."),
        click.option("--offline", type=click.Choice(["halt", "skip", "wait"]), help="A host offline at its turn."),
        click.option(
            "--offline-deadline",
            "offline_deadline_s",
            type=float,
            metavar="SECONDS",
            help="With --offline wait: how long a host may take to come back (default 3600).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _strategy(**options):
    from .errors import Refusal
    from .updates.strategy import Strategy

    body = {k: v for k, v in options.items() if v is not None}
    try:
        return Strategy.from_body(body)
    except Refusal as r:
        raise _refused(r) from None


def _print_plan(p) -> None:
    console = _console()
    waves = p.waves()
    click.echo(  # one line, never wrapped: scripts grep it
        f"Rollout to {p.target_version}: {len(p.hosts)} host(s) in {len(waves)} wave(s); "
        f"{p.strategy.describe(len(p.hosts))}"
    )
    click.echo(f"Selected: {p.selector.describe()}")
    if p.hosts:
        console.print(
            _table(
                None,
                ["#", "wave", "host", "agent", "note"],
                [
                    [
                        h.position + 1,
                        "canary" if p.strategy.canary and h.wave == 0 else h.wave,
                        h.host.name,
                        h.host.agent_version,
                        h.note or "",
                    ]
                    for h in p.hosts
                ],
            )
        )
    if p.left_out:
        console.print(f"Left out: {len(p.left_out)} host(s)")
        console.print(
            _table(None, ["host", "reason", "detail"], [[lo.host.name, lo.reason, lo.detail] for lo in p.left_out])
        )


@fleet_group.command("plan")
@_selector_options
@_strategy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the body of POST /api/fleet/plan).")
def fleet_plan(labels, os_name, arch, older_than, hosts, excludes, as_json, **strategy):
    """Show the waves a rollout would make, in order, and which hosts it leaves out and why. Changes nothing."""
    from .errors import Refusal
    from .updates import fleet

    selector = _selector(labels, os_name, arch, older_than, hosts, excludes)
    try:
        p = fleet.plan(strategy=_strategy(**strategy), selector=selector)
    except Refusal as r:
        raise _refused(r) from None
    if as_json:
        _echo_json({"plan": p.to_dict()})
    else:
        _print_plan(p)


@fleet_group.command("start")
@_selector_options
@click.option("--follow", is_flag=True, help="Watch the rollout until it ends; exit 0 if it succeeded, 1 if not.")
@click.option(
    "--interval", type=click.FloatRange(0.05, 60.0), default=1.0, show_default=True, help="Seconds between reads."
)
@_strategy_options
@click.option(
    "--at",
    "start_at",
    metavar="WHEN",
    help="Schedule the start: ISO 8601 with an offset (2026-12-05T02:00:00Z), or a local time with --timezone.",
)
@click.option("--timezone", metavar="ZONE", help="The IANA time zone of an --at without offset (e.g. Europe/Berlin).")
@click.option("--respect-windows", is_flag=True, help="Dispatch each host only inside its maintenance windows.")
def fleet_start(
    labels,
    os_name,
    arch,
    older_than,
    hosts,
    excludes,
    follow,
    interval,
    start_at,
    timezone,
    respect_windows,
    **strategy,
):
    """Start a rollout to the server's version, or schedule it with --at (the same as POST /api/fleet/update)."""
    from .errors import Refusal
    from .updates import schedule

    selector = _selector(labels, os_name, arch, older_than, hosts, excludes)
    try:
        fu = schedule.start_or_schedule("cli", selector, _strategy(**strategy), respect_windows, start_at, timezone)
    except Refusal as r:
        raise _refused(r) from None
    if fu.status == "scheduled":
        click.echo(f"fleet update {fu.id} to {fu.target_version} scheduled for {fu.start_at:%Y-%m-%d %H:%M:%S} UTC")
    else:
        click.echo(f"fleet update {fu.id} to {fu.target_version} started over {len(fu.hosts)} host(s)")
    if follow:
        raise click.exceptions.Exit(follow_rollout(fu.id, interval))


def _rollout(fleet_id: int | None) -> FleetUpdate:
    from .extensions import db
    from .models import FleetUpdate
    from .updates import fleet

    if fleet_id is not None:
        fu = db.session.get(FleetUpdate, fleet_id)
        if fu is None:
            raise _usage(f"no fleet update with id {fleet_id}")
        return fu
    fu = fleet.running()
    if fu is None:
        latest = fleet.history(1)
        if not latest:
            raise _usage("there is no fleet update yet")
        fu = latest[0]
    return fu


def outcome_code(status: str) -> int:
    """A rollout's status as an exit code: 0 scheduled, running or succeeded, 1 halted or cancelled."""
    return EXIT_OK if status in ("scheduled", "running", "succeeded") else EXIT_FAILED


@fleet_group.command("status")
@click.argument("fleet_id", type=int, required=False)
@click.option("--follow", is_flag=True, help="Watch the rollout until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's fleet update object).")
@click.option(
    "--interval", type=click.FloatRange(0.05, 60.0), default=1.0, show_default=True, help="Seconds between reads."
)
def fleet_status(fleet_id, follow, as_json, interval):
    """Show a rollout (default: the running or the latest); exit 1 if it halted or was cancelled."""
    fu = _rollout(fleet_id)
    if follow:
        raise click.exceptions.Exit(follow_rollout(fu.id, interval))
    d = fu.to_dict()
    if as_json:
        _echo_json({"fleet_update": d})
    else:
        for line in _summary_lines(d):
            click.echo(line)
        for h in d["hosts"]:
            click.echo(_host_line(h))
    raise click.exceptions.Exit(outcome_code(fu.status))


@fleet_group.command("cancel")
@click.argument("fleet_id", type=int, required=False)
def fleet_cancel(fleet_id):
    """Cancel a running rollout (default: the running one); the host being updated finishes its job."""
    from .errors import Refusal
    from .updates import fleet

    if fleet_id is None:
        running = fleet.running()
        if running is None:
            raise _usage("no fleet update is running")
        fleet_id = running.id
    try:
        fu = fleet.cancel(fleet_id, "cli")
    except Refusal as r:
        if r.code == "fleet_update_not_found":
            raise _usage(r.message) from None
        raise _refused(r) from None
    click.echo(f"fleet update {fu.id} cancelled")


def _running_id(fleet_id: int | None) -> int:
    from .updates import fleet

    if fleet_id is not None:
        return fleet_id
    running = fleet.running()
    if running is None:
        raise _usage("no fleet update is running")
    return running.id


def _control(action, fleet_id: int, *args):
    from .errors import Refusal

    try:
        return action(fleet_id, *args)
    except Refusal as r:
        if r.status == 404:
            raise _usage(r.message) from None
        raise _refused(r) from None


@fleet_group.command("pause")
@click.argument("fleet_id", type=int, required=False)
def fleet_pause(fleet_id):
    """Pause a running rollout (default: the running one): nothing new starts; hosts updating finish."""
    from .updates import fleet

    fu = _control(fleet.pause, _running_id(fleet_id), "cli")
    click.echo(f"fleet update {fu.id} paused")


@fleet_group.command("resume")
@click.argument("fleet_id", type=int, required=False)
def fleet_resume(fleet_id):
    """Resume a paused rollout (default: the running one); the server's next tick goes on."""
    from .updates import fleet

    fu = _control(fleet.resume, _running_id(fleet_id), "cli")
    click.echo(f"fleet update {fu.id} resumed")


@fleet_group.command("skip")
@click.argument("host")
@click.option("--fleet-id", type=int, help="The rollout (default: the running one).")
def fleet_skip(host, fleet_id):
    """Skip one pending HOST (name or id) of a running rollout: it is recorded skipped, never updated."""
    from .updates import fleet

    [host_id] = _host_ids((host,))
    fu = _control(fleet.skip_host, _running_id(fleet_id), host_id, "cli")
    click.echo(f"fleet update {fu.id}: {host} skipped")


def _follow_options(fn):
    fn = click.option(
        "--interval", type=click.FloatRange(0.05, 60.0), default=1.0, show_default=True, help="Seconds between reads."
    )(fn)
    fn = click.option(
        "--follow", is_flag=True, help="Watch the new rollout until it ends; exit 0 if it succeeded, 1 if not."
    )(fn)
    return click.argument("fleet_id", type=int, required=False)(fn)


def _start_from(operation, fleet_id, follow, interval, what: str) -> None:
    """Start a rollout made from a finished one (default: the latest) and maybe follow it."""
    fid = fleet_id if fleet_id is not None else _rollout(None).id
    fu = _control(operation, fid, "cli")
    click.echo(f"fleet update {fu.id} {what} {len(fu.hosts)} host(s) of fleet update {fid}")
    if follow:
        raise click.exceptions.Exit(follow_rollout(fu.id, interval))


@fleet_group.command("retry")
@_follow_options
def fleet_retry(fleet_id, follow, interval):
    """Start a rollout of the failed and skipped hosts of a finished one (default: the latest), same strategy."""
    from .updates import fleet

    _start_from(fleet.retry, fleet_id, follow, interval, "retries")


@fleet_group.command("revert")
@_follow_options
def fleet_revert(fleet_id, follow, interval):
    """Take the hosts a finished rollout (default: the latest) updated back to the version each ran before."""
    from .updates import revert

    _start_from(revert.start, fleet_id, follow, interval, "reverts")


# --- following a rollout ---------------------------------------------------------------------------


def _elapsed(d: dict) -> float:
    from datetime import datetime

    from .timeutil import utcnow

    start = datetime.fromisoformat(d["created_at"].replace("Z", "+00:00")).replace(tzinfo=None)
    end = (
        datetime.fromisoformat(d["finished_at"].replace("Z", "+00:00")).replace(tzinfo=None)
        if d["finished_at"]
        else utcnow()
    )
    return max(0.0, (end - start).total_seconds())


def _counts(d: dict) -> dict:
    counts: dict[str, int] = {}
    for h in d["hosts"]:
        counts[h["status"]] = counts.get(h["status"], 0) + 1
    return counts


def _summary_lines(d: dict) -> list[str]:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(_counts(d).items()))
    lines = [
        f"fleet update {d['id']} to {d['target_version']}: {d['status']}, {d['done']}/{d['total']} done "
        f"({counts}), {_elapsed(d):.0f} s"
    ]
    if d.get("halt_reason"):
        lines.append(f"halted: {d['halt_reason']}")
    return lines


def _host_line(h: dict) -> str:
    phase = f" ({h['phase']})" if h.get("phase") and h["status"] == "running" else ""
    error = f": {h['error']}" if h.get("error") else ""
    return f"  {h['position'] + 1:>3}. {h['name']}: {h['status']}{phase}{error}"


def _render(d: dict):
    from rich.console import Group
    from rich.text import Text

    header = Text("\n".join(_summary_lines(d)))
    rows = []
    for h in d["hosts"]:
        dur = f"{h['duration_s']:.1f} s" if h.get("duration_s") is not None else ""
        rows.append([h["position"] + 1, h["name"], h["status"], h.get("phase") or "", dur, h.get("error") or ""])
    return Group(header, _table(None, ["#", "host", "status", "phase", "took", "error"], rows))


def _read(fleet_id: int) -> dict:
    from .extensions import db
    from .models import FleetUpdate

    db.session.rollback()  # a fresh snapshot: the server process writes the rows
    db.session.expire_all()
    return db.session.get(FleetUpdate, fleet_id).to_dict()


def follow_rollout(fleet_id: int, interval: float = 1.0, out=None, tty: bool | None = None) -> int:
    """Watch a rollout until it ends; return its exit code (0 succeeded, 1 halted or cancelled).

    In a terminal, a live table (per-host status and phase, counts, elapsed time); otherwise one
    plain line per change, so a log or a pipe reads well.
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    d = _read(fleet_id)
    if tty:
        from rich.console import Console
        from rich.live import Live

        with Live(_render(d), console=Console(file=out, force_terminal=True), refresh_per_second=4) as live:
            while d["status"] in ("scheduled", "running"):
                time.sleep(interval)
                d = _read(fleet_id)
                live.update(_render(d))
        return outcome_code(d["status"])
    seen: dict = {}
    while True:
        for h in d["hosts"]:
            key = (h["status"], h.get("phase"), h.get("error"))
            if seen.get(h["position"]) != key:
                seen[h["position"]] = key
                print(_host_line(h).strip(), file=out, flush=True)
        if d["status"] not in ("scheduled", "running"):
            for line in _summary_lines(d):
                print(line, file=out, flush=True)
            return outcome_code(d["status"])
        time.sleep(interval)
        d = _read(fleet_id)


# --- maintenance windows -------------------------------------------------------------------------

windows_group = AppGroup("windows", help="List, add and delete maintenance windows.")


@windows_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's maintenance window objects).")
def windows_list(as_json):
    """List maintenance windows: when, which hosts, open now, next opening (UTC)."""
    from .updates import maintenance

    found = [maintenance.to_dict(w) for w in maintenance.list_windows()]
    if as_json:
        _echo_json({"maintenance_windows": found})
        return
    rows = [
        [
            w["id"],
            w["name"],
            w["description"],
            ", ".join(f"{k}={v}" for k, v in sorted(w["labels"].items())) or "every host",
            "open" if w["open_now"] else "closed",
            w["next_open"],
        ]
        for w in found
    ]
    console = _console()
    console.print(f"{len(found)} maintenance window(s)")
    console.print(_table(None, ["id", "name", "when", "hosts", "now", "next opens (UTC)"], rows))


@windows_group.command("add")
@click.argument("name")
@click.option("--days", required=True, help="Weekdays, e.g. sat,sun or 5,6 (0 = Monday).")
@click.option("--start", required=True, metavar="HH:MM", help="Opens at this wall-clock time.")
@click.option("--end", required=True, metavar="HH:MM", help="Closes at this time (before --start: the next day).")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone, e.g. Europe/Berlin.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Only hosts with this label (repeat).")
def windows_add(name, days, start, end, timezone, labels):
    """Add a weekly maintenance window (the same as POST /api/maintenance-windows)."""
    from .errors import Refusal
    from .labels import parse_pairs
    from .updates import maintenance
    from .updates.windows import WindowError, parse_day_names

    try:
        fields = {
            "name": name,
            "days": parse_day_names(d for d in days.split(",") if d.strip()),
            "start": start,
            "end": end,
            "timezone": timezone,
            "labels": parse_pairs(labels),
        }
        row = maintenance.create("cli", fields)
    except WindowError as e:
        raise _usage(str(e)) from None
    except Refusal as r:
        raise (_usage(r.message) if r.status == 400 else _refused(r)) from None
    click.echo(f"maintenance window {row.id} {row.name!r} added: {maintenance.to_dict(row)['description']}")


@windows_group.command("delete")
@click.argument("window")
def windows_delete(window):
    """Delete a maintenance window (by name or id)."""
    from .errors import Refusal
    from .updates import maintenance

    try:
        row = maintenance.by_name_or_id(window)
    except Refusal as r:
        raise _usage(r.message) from None
    name = row.name
    maintenance.delete(row, "cli")
    click.echo(f"maintenance window {name!r} deleted")
