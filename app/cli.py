"""The ``restic-manager`` command line. Every command takes the same ``RM_*`` environment as ``serve``."""

from __future__ import annotations

import os
import sys

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from .config import ConfigError


def _create_app():
    from . import create_app

    return create_app()


def _read_password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    if len(pw) < 8:
        raise click.UsageError("the password must be at least 8 characters")
    return pw


def register_cli(app: Flask) -> None:
    from .extensions import db
    from .models import ApiToken, AuditEvent, Host, User

    @app.cli.command("serve")
    @click.option(
        "--ready-file", type=click.Path(dir_okay=False), help="Write 'ADMIN_PORT AGENT_PORT' here once listening."
    )
    @click.option("--no-build", is_flag=True, help="Do not build the agent release for this version on start.")
    def serve_cmd(ready_file, no_build):
        """Run the admin plane, the agent plane and the scheduler."""
        from .serve import serve

        current_app.config["BUILD_AGENT_ON_START"] = not no_build
        raise SystemExit(serve(current_app._get_current_object(), ready_file=ready_file))

    users = click.Group("users", help="Manage user accounts.")
    app.cli.add_command(users)

    @users.command("create")
    @click.argument("name")
    @click.option("--role", type=click.Choice(["admin", "viewer"]), default="viewer", show_default=True)
    @click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
    @with_appcontext
    def users_create(name, role, password_stdin):
        """Create a user; the password is prompted for (or read from stdin)."""
        if db.session.scalar(sa.select(User).where(User.username == name)):
            raise click.ClickException(f"user {name!r} already exists")
        user = User(username=name, role=role)
        user.set_password(_read_password(password_stdin))
        db.session.add(user)
        AuditEvent.record("cli", "user.created", name, role=role)
        db.session.commit()
        click.echo(f"created {role} {name}")

    @users.command("set-password")
    @click.argument("name")
    @click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
    @with_appcontext
    def users_set_password(name, password_stdin):
        """Set a user's password (and lift a login lock-out)."""
        user = db.session.scalar(sa.select(User).where(User.username == name))
        if user is None:
            raise click.ClickException(f"no user {name!r}")
        user.set_password(_read_password(password_stdin))
        user.failed_logins, user.locked_until = 0, None
        AuditEvent.record("cli", "user.password_set", name)
        db.session.commit()
        click.echo(f"password set for {name}")

    tokens = click.Group("tokens", help="Manage API tokens for scripts.")
    app.cli.add_command(tokens)

    @tokens.command("create")
    @click.option("--user", "username", required=True)
    @click.option("--name", default="cli", show_default=True)
    @with_appcontext
    def tokens_create(username, name):
        """Create an API token for a user and print it (once)."""
        user = db.session.scalar(sa.select(User).where(User.username == username))
        if user is None:
            raise click.ClickException(f"no user {username!r}")
        tok, plain = ApiToken.issue(user, name)
        AuditEvent.record("cli", "token.created", username, prefix=tok.prefix)
        db.session.commit()
        click.echo(plain)

    hosts = click.Group("hosts", help="Manage enrolled hosts.")
    app.cli.add_command(hosts)

    @hosts.command("add")
    @click.argument("name")
    @with_appcontext
    def hosts_add(name):
        """Enrol a host; print its agent token and install one-liner (once)."""
        from .agents import install_command

        if db.session.scalar(sa.select(Host).where(Host.name == name)):
            raise click.ClickException(f"host {name!r} already exists")
        host, token = Host.enrol(name)
        db.session.flush()
        AuditEvent.record("cli", "host.enrolled", name, host_id=host.id)
        db.session.commit()
        click.echo(f"host {name} (id {host.id})")
        click.echo(f"agent token: {token}")
        click.echo(f"install: {install_command(token)}")

    @app.cli.command("build-agent")
    @click.option("--version", "version", default=None, help="Version to bake in (default: this build's).")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
    @click.option("--register", is_flag=True, help="Also register the artifact as a release in the database.")
    @with_appcontext
    def build_agent_cmd(version, out_dir, register):
        """Build the agent zipapp (reproducibly) and print its path, size and sha256."""
        from agent.build import build_agent

        version = version or current_app.config["SERVER_VERSION"]
        built = build_agent(version, out_dir)
        click.echo(f"{built.path} {built.size} {built.sha256}")
        if register:
            from .updates import releases

            releases.register(built.path, version, built.platform)

    @app.cli.command("demo")
    @click.option(
        "--agent-version",
        default="0.0.1+demo",
        show_default=True,
        help="Version the demo agent claims, so it shows as behind and can be updated.",
    )
    def demo_cmd(agent_version):
        """Migrate, create an admin and a demo host, then serve with one local demo agent."""
        from .demo import run_demo

        raise SystemExit(run_demo(current_app._get_current_object(), agent_version))


def main(argv=None) -> None:
    """Entry point of the ``restic-manager`` console script."""
    os.environ.setdefault("FLASK_RUN_FROM_CLI", "false")
    group = FlaskGroup(
        create_app=_create_app, add_default_commands=False, load_dotenv=False, help="restic-manager fleet server."
    )
    from flask_migrate.cli import db as db_group

    group.add_command(db_group)
    try:
        group.main(args=argv, prog_name="restic-manager")
    except ConfigError as e:
        click.echo(f"restic-manager: config error: {e}", err=True)
        raise SystemExit(2) from None
