"""The ``restic-manager`` commands' access to the app, made only when a command runs.

An operator runs the command line often (in loops, in scripts), so ``--help``, ``--version`` and a
usage error must answer without importing Flask, SQLAlchemy or the models. The command modules
(app/cli.py, app/opcli.py) therefore import only :mod:`click` at the top and the rest inside the
command functions; the app is created by :func:`with_appcontext` (and :class:`AppGroup`, which
applies it to each of its commands) just before the command body runs, after click has parsed and
checked the arguments. This module must stay as light as they are.
"""

from __future__ import annotations

import functools

import click


def _create_app():
    from . import create_app

    return create_app()


def script_info(ctx: click.Context):
    """The :class:`flask.cli.ScriptInfo` that loads this product's app: the one a caller passed
    (``flask``, Flask's test runner), else one made now and kept on the root context."""
    from flask.cli import ScriptInfo

    info = ctx.find_object(ScriptInfo)
    if info is None:
        info = ScriptInfo(create_app=_create_app, set_debug_flag=False, load_dotenv_defaults=False)
        ctx.find_root().obj = info
    return info


def push_app_context(ctx: click.Context) -> None:
    """Load the app (created once per ScriptInfo) and push its context for the rest of ``ctx``,
    unless it is the current app already: what ``FlaskGroup.get_command`` does."""
    from flask import current_app

    app = script_info(ctx).load_app()
    if not current_app or current_app._get_current_object() is not app:
        ctx.with_resource(app.app_context())


def with_appcontext(f):
    """Run the command inside an app context, as :func:`flask.cli.with_appcontext` does, but
    import Flask and create the app only when the command runs."""

    @click.pass_context
    def decorator(ctx, /, *args, **kwargs):
        push_app_context(ctx)
        return ctx.invoke(f, *args, **kwargs)

    return functools.update_wrapper(decorator, f)


class AppGroup(click.Group):
    """:class:`flask.cli.AppGroup` without importing Flask: its commands run in an app context."""

    def command(self, *args, **kwargs):
        wrap_for_ctx = kwargs.pop("with_appcontext", True)

        def decorator(f):
            if wrap_for_ctx:
                f = with_appcontext(f)
            return click.Group.command(self, *args, **kwargs)(f)

        return decorator
