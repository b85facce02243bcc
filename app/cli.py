"""The ``restic-manager`` command line. Every command takes the same ``RM_*`` environment as ``serve``."""

from __future__ import annotations

import os
import sys

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup, with_appcontext

from . import opcli
from .config import ConfigError
from .errors import Refusal
from .extensions import db
from .models import ROLES, ApiToken, AuditEvent, Host, User


def _create_app():
    from . import create_app

    return create_app()


def _read_password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


def _existing_user(name: str) -> User:
    user = User.by_username(name)
    if user is None:
        raise click.ClickException(f"no user {name!r}")
    return user


# Groups are flask's ``AppGroup``: their commands run inside an app context, as ``app.cli``'s do.
# ``db`` is Flask-Migrate's group, loaded by :meth:`ProductGroup.get_command` when asked for.
users_group = AppGroup("users", help="Manage user accounts.")
tokens_group = AppGroup("tokens", help="Manage API tokens for scripts.")
hosts_group = AppGroup("hosts", help="Manage enrolled hosts.")
releases_group = AppGroup("releases", help="Manage agent release artifacts.")


@click.command("serve")
@click.option(
    "--ready-file", type=click.Path(dir_okay=False), help="Write 'ADMIN_PORT AGENT_PORT' here once listening."
)
@click.option("--no-build", is_flag=True, help="Do not build the agent release for this version on start.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes sharing the agent port through SO_REUSEPORT (PostgreSQL only).",
)
@with_appcontext
def serve_cmd(ready_file, no_build, workers):
    """Run the admin plane, the agent plane and the scheduler."""
    from .serve import serve

    app = current_app._get_current_object()
    app.config["BUILD_AGENT_ON_START"] = not no_build
    if workers > 1:
        from .workers import serve_workers

        raise SystemExit(serve_workers(app, workers, ready_file=ready_file))
    raise SystemExit(serve(app, ready_file=ready_file))


@users_group.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def users_create(name, role, password_stdin):
    """Create a user; the password is prompted for (or read from stdin)."""
    if User.by_username(name) is not None:  # before the prompt, not after it
        raise click.ClickException(f"user {name!r} already exists")
    try:
        User.create(name, _read_password(password_stdin), role, actor="cli")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    db.session.commit()
    click.echo(f"created {role} {name}")


@users_group.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def users_set_password(name, password_stdin):
    """Set a user's password, end their sessions and lift a login lock-out."""
    from .auth import throttle

    user = _existing_user(name)
    try:
        user.set_password(_read_password(password_stdin))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    throttle.lift(name)
    AuditEvent.record("cli", "user.password_set", name)
    db.session.commit()
    click.echo(f"password set for {name}; their sessions are ended")


@users_group.command("list")
def users_list():
    """List users: name, role, status, active API tokens."""
    click.echo(f"{'ID':>4}  {'USERNAME':<24} {'ROLE':<7} {'STATUS':<9} TOKENS")
    for u in db.session.scalars(sa.select(User).order_by(User.username)):
        status = "enabled" if u.is_active else "disabled"
        click.echo(f"{u.id:>4}  {u.username:<24} {u.role:<7} {status:<9} {u.token_count()}")


def _refusable(operation, *args):
    """Run a user operation and commit; a refusal (the last admin) is a clean error exit."""
    try:
        result = operation(*args)
    except Refusal as r:
        db.session.rollback()
        raise click.ClickException(r.message) from None
    db.session.commit()
    return result


@users_group.command("disable")
@click.argument("name")
def users_disable(name):
    """Disable a user: their sessions end and their API tokens stop working."""
    changed = _refusable(_existing_user(name).disable, "cli")
    click.echo(f"disabled {name}" if changed else f"{name} was already disabled")


@users_group.command("enable")
@click.argument("name")
def users_enable(name):
    """Enable a disabled user again (and lift a login lock-out)."""
    from .auth import throttle

    user = _existing_user(name)
    throttle.lift(name)
    changed = _refusable(user.enable, "cli")
    click.echo(f"enabled {name}" if changed else f"{name} was already enabled")


@users_group.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(ROLES))
def users_set_role(name, role):
    """Change a user's role; their sessions end (they log in again with the new role)."""
    changed = _refusable(_existing_user(name).set_role, role, "cli")
    click.echo(f"{name} is now {role}" if changed else f"{name} already is {role}")


@users_group.command("delete")
@click.argument("name")
@click.confirmation_option(prompt="Delete this user and all of their API tokens?")
def users_delete(name):
    """Delete a user and their API tokens (the audit log keeps their name)."""
    _refusable(_existing_user(name).remove, "cli")
    click.echo(f"deleted {name}")


@tokens_group.command("create")
@click.option("--user", "username", required=True)
@click.option("--name", default="cli", show_default=True)
def tokens_create(username, name):
    """Create an API token for a user and print it (once)."""
    _, plain = ApiToken.issue(_existing_user(username), name, actor="cli")
    db.session.commit()
    click.echo(plain)


@hosts_group.command("add")
@click.argument("name")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Give the host this label (repeat it).")
def hosts_add(name, labels):
    """Enrol a host; print its agent token and install one-liner (once)."""
    from .hosts import enrol
    from .labels import parse_pairs

    try:
        enrolment = enrol(name, "cli", labels=parse_pairs(labels))
    except Refusal as e:
        raise click.ClickException(e.message) from None
    click.echo(f"host {enrolment.host.name} (id {enrolment.host.id})")
    click.echo(f"agent token: {enrolment.token}")
    click.echo(f"install: {enrolment.install_command}")
    if enrolment.no_release_key_warning:
        click.secho(f"WARNING: {enrolment.no_release_key_warning}", fg="yellow", bold=True, err=True)


@hosts_group.command("label")
@click.argument("name")
@click.argument("edits", nargs=-1, metavar="[KEY=VALUE | KEY-]...")
@click.option("--clear", is_flag=True, help="Remove every label first (then apply the KEY=VALUE ones).")
def hosts_label(name, edits, clear):
    """Set (KEY=VALUE) or remove (KEY-) a host's labels, then print them; without edits, just print them."""
    from . import hosts
    from .labels import format_pairs, merged, parse_edits

    host = db.session.scalar(sa.select(Host).where(Host.name == name))
    if host is None:
        raise click.UsageError(f"no host named {name!r}")
    try:
        to_set, to_remove = parse_edits(edits)
        if edits or clear:
            current = {} if clear else host.labels
            changed = hosts.set_labels(host, merged(current, {**to_set, **dict.fromkeys(to_remove)}), "cli")
            click.echo(f"labels of {name} {'changed' if changed else 'unchanged'}", err=True)
    except Refusal as e:
        raise click.UsageError(e.message) from None
    click.echo(format_pairs(host.labels) or "(no labels)")


@click.command("build-agent")
@click.option("--version", "version", default=None, help="Version to bake in (default: this build's).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--sign-key", type=click.File("rb"), help="Ed25519 release key (PEM): write <artifact>.sig.")
@click.option("--register", is_flag=True, help="Also register the artifact as a release in the database.")
@with_appcontext
def build_agent_cmd(version, out_dir, sign_key, register):
    """Build the agent zipapp (reproducibly) and print its path, size and sha256."""
    from agent.build import build_agent

    from .updates import releases

    version = version or current_app.config["SERVER_VERSION"]
    built = build_agent(version, out_dir)
    if sign_key is not None:
        releases.sign_file(built.path, version, built.platform, sign_key.read())
    click.echo(f"{built.path} {built.size} {built.sha256}")
    if register:
        releases.register(built.path, version, built.platform)


@releases_group.command("add")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--version", "version", required=True)
@click.option("--platform", default=None, help="Artifact platform (default: py3-any).")
def releases_add(artifact, version, platform):
    """Register a built (and signed: <artifact>.sig) artifact as a release."""
    from .updates import releases

    rel = releases.register(artifact, version, platform)
    AuditEvent.record(
        "cli", "release.registered", f"{rel.version}/{rel.platform}", sha256=rel.sha256, signed=bool(rel.signature)
    )
    db.session.commit()
    click.echo(
        f"registered {rel.version} {rel.platform} {rel.size} {rel.sha256} {'signed' if rel.signature else 'UNSIGNED'}"
    )


@click.command("release-key")
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the private key (PEM, mode 0600). Keep it offline.",
)
@with_appcontext
def release_key_cmd(out_path):
    """Generate an Ed25519 release key; print the public key to pin in agent configs."""
    from agent.signing import generate_keypair

    private_pem, public_b64 = generate_keypair()
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    click.echo(f"private key: {out_path}")
    click.echo(f'release_public_key = "{public_b64}"')


@click.command("demo")
@click.option(
    "--agent-version",
    default="0.0.0.dev0+demo",
    show_default=True,
    help="Version the demo agent claims, so it shows as behind and can be updated.",
)
@with_appcontext
def demo_cmd(agent_version):
    """Migrate, create an admin and a demo host, then serve with one local demo agent."""
    from .demo import run_demo

    raise SystemExit(run_demo(current_app._get_current_object(), agent_version))


hosts_group.add_command(opcli.hosts_list)

#: Every top-level command and group of ``restic-manager`` (besides Flask-Migrate's ``db``).
COMMANDS = (
    serve_cmd,
    users_group,
    tokens_group,
    hosts_group,
    opcli.jobs_group,
    opcli.fleet_group,
    opcli.windows_group,
    build_agent_cmd,
    releases_group,
    release_key_cmd,
    demo_cmd,
)


def register_cli(app: Flask) -> None:
    """Add the commands to ``app.cli`` (what ``flask`` and ``restic-manager`` run)."""
    for command in COMMANDS:
        app.cli.add_command(command)


#: Flask's own options, which mean nothing to an operator of this product.
_FLASK_ONLY_PARAMS = ("env_file", "app", "debug")


class ProductGroup(FlaskGroup):
    """``restic-manager``: Flask's command group without Flask's options (``--app``, ``--debug``,
    ``--env-file``) and with the product's ``--version``."""

    def __init__(self, **extra):
        super().__init__(
            create_app=_create_app,
            add_default_commands=False,
            add_version_option=False,
            load_dotenv=False,
            set_debug_flag=False,
            **extra,
        )
        self.params = [p for p in self.params if p.name not in _FLASK_ONLY_PARAMS]
        click.version_option(
            product_version(), "--version", "-V", prog_name="restic-manager", message="%(prog)s %(version)s"
        )(self)

    # Flask-Migrate's ``db`` group is loaded when asked for: importing it imports Alembic, which
    # the other commands (``serve`` above all) do not need.
    def get_command(self, ctx, name):
        if name == "db" and "db" not in self.commands:
            from flask_migrate.cli import db as db_group

            self.add_command(db_group)
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "db"})


def product_version() -> str:
    from agent.version import get_version

    return get_version()


def _schema_problem(exc: Exception) -> bool:
    """True when a database error says a table or column is missing: the schema is not upgraded."""
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in ("no such table", "no such column", "does not exist", "undefinedtable"))


def main(argv=None) -> None:
    """Entry point of the ``restic-manager`` console script."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    os.environ.setdefault("FLASK_RUN_FROM_CLI", "false")
    group = ProductGroup(help="restic-manager fleet server.")
    try:
        group.main(args=argv, prog_name="restic-manager")
    except ConfigError as e:
        click.echo(f"restic-manager: config error: {e}", err=True)
        raise SystemExit(2) from None
    except (OperationalError, ProgrammingError) as e:
        if not _schema_problem(e):
            raise
        click.echo(
            "restic-manager: the database has no restic-manager tables, or older ones than this version needs "
            f"({str(e.orig).splitlines()[0]}). Run `restic-manager db upgrade` first (with the same RM_* settings).",
            err=True,
        )
        raise SystemExit(1) from None
