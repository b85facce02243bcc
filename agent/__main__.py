"""Command line entry point: ``restic-manager-agent --config FILE`` (also ``python -m agent``)."""

from __future__ import annotations

import argparse
import logging
import sys

from agent.daemon import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_UPDATE_RESTART, StopFlag, install_signal_handlers, sd_notify
from agent.version import get_version

__all__ = ["EX_CONFIG", "EX_OK", "EX_SOFTWARE", "EX_UPDATE_RESTART", "main"]

PROG = "restic-manager-agent"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The restic-manager agent service.")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (required)")
    parser.add_argument("--version", action="store_true", help="print the agent version and exit")
    parser.add_argument(
        "--install-guard",
        metavar="DIR",
        help="write the start-up guard script (systemd ExecStartPre=) into DIR and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the agent until it is stopped or restarts for an update; return the exit code."""
    args = _parser().parse_args(argv)
    if args.version:
        print(get_version())
        return EX_OK
    if args.install_guard:
        from agent.recovery import install_guard

        try:
            print(install_guard(args.install_guard))
        except OSError as exc:
            print(f"{PROG}: cannot install the guard: {exc}", file=sys.stderr)
            return EX_SOFTWARE
        return EX_OK
    if not args.config:
        _parser().error("the following arguments are required: --config")

    from agent.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EX_CONFIG

    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Imported late, so --version and config errors stay fast and independent of simple-websocket;
    # but imported here, never after a swap: zipimport reads a lazily imported module from the
    # program *path*, which by then holds another archive (EOFError, "bad local file header").
    from agent import reexec
    from agent.client import Agent

    stop = StopFlag()
    install_signal_handlers(stop)
    agent = Agent(config, stop=stop)
    sd_notify("READY=1")
    try:
        code = agent.run()
    except Exception:  # last resort: log it and let the service manager restart us
        logging.getLogger("agent").exception("agent crashed")
        return EX_SOFTWARE
    if agent.restart_pending and agent.program and config.restart_mode == "exec" and reexec.supported():
        # returns only if the exec failed (or a stop came in meanwhile): then exit as before
        reexec.restart_in_place(agent.program, config.state_dir, stopped=stop.is_set)
    sd_notify("STOPPING=1")
    if stop.signum is not None:
        logging.getLogger("agent").info("stopped by signal %d", stop.signum)
    return code


if __name__ == "__main__":
    sys.exit(main())
