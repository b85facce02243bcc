"""The ``restic-manager`` command line. Every command takes the same ``RM_*`` environment as ``serve``.

Only :mod:`click` is imported at the top (here and in app/opcli.py, app/cliapp.py): the app, the
models, SQLAlchemy and Flask are imported inside the commands that need them, and Flask-Migrate
(Alembic) only for ``db``. So ``--help``, ``--version`` and usage errors answer in a fraction of
the time a command that opens the database takes (docs/architecture.md, "The command line").
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from . import opcli
from .cliapp import AppGroup, script_info, with_appcontext
from .config import ConfigError
from .roles import ROLES

if TYPE_CHECKING:
    from flask import Flask

    from .models import User


def _read_password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


def _existing_user(name: str) -> User:
    from .models import User

    user = User.by_username(name)
    if user is None:
        raise click.ClickException(f"no user {name!r}")
    return user


# Groups are ``AppGroup`` (app/cliapp.py): their commands run inside an app context, as ``app.cli``'s do.
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
    from flask import current_app

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
    from .extensions import db
    from .models import User

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
    from .extensions import db
    from .models import AuditEvent

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
    import sqlalchemy as sa

    from .extensions import db
    from .models import User

    click.echo(f"{'ID':>4}  {'USERNAME':<24} {'ROLE':<7} {'STATUS':<9} TOKENS")
    for u in db.session.scalars(sa.select(User).order_by(User.username)):
        status = "enabled" if u.is_active else "disabled"
        click.echo(f"{u.id:>4}  {u.username:<24} {u.role:<7} {status:<9} {u.token_count()}")


def _refusable(operation, *args):
    """Run a user operation and commit; a refusal (the last admin) is a clean error exit."""
    from .errors import Refusal
    from .extensions import db

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
    from .extensions import db
    from .models import ApiToken

    _, plain = ApiToken.issue(_existing_user(username), name, actor="cli")
    db.session.commit()
    click.echo(plain)


@hosts_group.command("add")
@click.argument("name")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Give the host this label (repeat it).")
def hosts_add(name, labels):
    """Enrol a host; print its agent token and install one-liner (once)."""
    from .errors import Refusal
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
    import sqlalchemy as sa

    from . import hosts
    from .errors import Refusal
    from .extensions import db
    from .labels import format_pairs, merged, parse_edits
    from .models import Host

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
    from flask import current_app

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
    from .extensions import db
    from .models import AuditEvent
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
    from flask import current_app

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


#: ``db``'s line in ``restic-manager --help``, so listing the commands does not import Alembic
#: (tests/server/test_cli.py checks it is Flask-Migrate's own).
DB_SHORT_HELP = "Perform database migrations."


class ProductGroup(click.Group):
    """``restic-manager``: the product's commands, ``--version``, and Flask-Migrate's ``db``.

    Not Flask's ``FlaskGroup``, which creates the app to list or even to find a command: this
    group knows its commands without the app, and each command creates it when it runs
    (app/cliapp.py). Flask's options (``--app``, ``--debug``, ``--env-file``) are not offered.
    """

    def __init__(self, **extra):
        # FlaskGroup's prefix: an option also reads FLASK_<COMMAND>_<OPTION>, as it always has.
        extra.setdefault("context_settings", {}).setdefault("auto_envvar_prefix", "FLASK")
        super().__init__(commands=COMMANDS, **extra)
        click.version_option(
            product_version(), "--version", "-V", prog_name="restic-manager", message="%(prog)s %(version)s"
        )(self)

    def make_context(self, info_name, args, parent=None, **extra):
        # As FlaskGroup does: a stray app.run() in a command's import path must not start a server.
        os.environ["FLASK_RUN_FROM_CLI"] = "true"
        return super().make_context(info_name, args, parent=parent, **extra)

    # Flask-Migrate's ``db`` group is loaded when asked for: importing it imports Alembic, which
    # the other commands (``serve`` above all) do not need. Its commands find the app through the
    # ScriptInfo that script_info() puts on the root context.
    def get_command(self, ctx, name):
        if name == "db" and "db" not in self.commands:
            from flask_migrate.cli import db as db_group

            script_info(ctx)
            self.add_command(db_group)
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "db"})

    def format_commands(self, ctx, formatter):
        """click's listing, with a stand-in for ``db`` (its line from :data:`DB_SHORT_HELP`)."""
        stand_in = "db" not in self.commands
        if stand_in:
            self.commands["db"] = click.Group("db", help=DB_SHORT_HELP)
        try:
            super().format_commands(ctx, formatter)
        finally:
            if stand_in:
                del self.commands["db"]


def product_version() -> str:
    from agent.version import get_version

    return get_version()


def _schema_problem(exc: BaseException) -> bool:
    """True when a database error says a table or column is missing: the schema is not upgraded."""
    sa_exc = sys.modules.get("sqlalchemy.exc")  # not imported: no database was opened
    if sa_exc is None or not isinstance(exc, (sa_exc.OperationalError, sa_exc.ProgrammingError)):
        return False
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in ("no such table", "no such column", "does not exist", "undefinedtable"))


def main(argv=None) -> None:
    """Entry point of the ``restic-manager`` console script."""
    os.environ.setdefault("FLASK_RUN_FROM_CLI", "false")
    group = ProductGroup(help="restic-manager fleet server.")
    try:
        group.main(args=argv, prog_name="restic-manager")
    except ConfigError as e:
        click.echo(f"restic-manager: config error: {e}", err=True)
        raise SystemExit(2) from None
    except Exception as e:
        if not _schema_problem(e):
            raise
        click.echo(
            "restic-manager: the database has no restic-manager tables, or older ones than this version needs "
            f"({str(e.orig).splitlines()[0]}). Run `restic-manager db upgrade` first (with the same RM_* settings).",
            err=True,
        )
        raise SystemExit(1) from None
