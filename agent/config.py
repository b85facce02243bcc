"""The agent's TOML configuration file, parsed strictly so mistakes stop start-up with one clear line."""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent import program_path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_BACKOFF_MAX_S = 10.0

DEFAULT_PROBATION_S = 60.0

_KNOWN_KEYS = (
    "server_url",
    "token",
    "heartbeat_s",
    "backoff_max_s",
    "state_dir",
    "log_level",
    "release_public_key",
    "allow_unsigned_updates",
    "probation_s",
    "server_ca",
    "restart_mode",
)
#: How the agent starts the program file after a swap or a rollback (agent/reexec.py).
RESTART_MODES = ("exec", "exit")


class ConfigError(Exception):
    """The configuration file is missing or wrong; the message names the file and the key."""


@dataclass(frozen=True)
class AgentConfig:
    path: str
    server_url: str  # ws:// or wss://, without a trailing slash
    token: str
    heartbeat_s: float | None  # None: use the interval the server's welcome asks for
    backoff_max_s: float
    state_dir: str
    log_level: str
    release_public_key: str | None = None  # base64 raw ed25519 key pinned at install
    allow_unsigned_updates: bool = False  # lab opt-out: accept unsigned releases when no key is pinned
    probation_s: float = DEFAULT_PROBATION_S  # a new program must reach the server within this
    server_ca: str | None = None  # PEM CA file the server's certificate must chain to (else the system store)
    # "exec": re-execute the swapped-in program in place (POSIX); "exit": exit 0 for the service manager
    restart_mode: str = "exec"

    @property
    def updates_allowed(self) -> bool:
        """True when the config lets this agent accept an update at all (a key, or the opt-out)."""
        return bool(self.release_public_key) or self.allow_unsigned_updates

    @property
    def ws_url(self) -> str:
        return self.server_url + "/ws/agent"


def load_config(path: str) -> AgentConfig:
    """Read and validate the config file at ``path``; raise :class:`ConfigError` on any problem."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: file is not UTF-8") from None
    return parse_config(raw, path)


def parse_config(raw: dict, path: str) -> AgentConfig:
    """Validate an already-parsed TOML table."""

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    unknown = sorted(set(raw) - set(_KNOWN_KEYS))
    if unknown:  # a typo such as "server-url" must not silently fall back to a default
        raise fail(f"unknown key {unknown[0]!r} (known keys: {', '.join(_KNOWN_KEYS)})")
    for key in ("server_url", "token"):
        if key not in raw:
            raise fail(f"missing required key {key!r}")

    server_url = _string(raw, "server_url", fail)
    parts = urlsplit(server_url)
    if parts.scheme not in ("ws", "wss"):
        raise fail(f"'server_url' must start with ws:// or wss://, got {server_url!r}")
    try:
        port_ok = parts.hostname is not None and (parts.port is None or parts.port > 0)
    except ValueError:
        port_ok = False
    if not port_ok:
        raise fail(f"'server_url' has no valid host or port: {server_url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise fail("'server_url' must not carry credentials, a query or a fragment")

    token = _string(raw, "token", fail)
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in token):
        raise fail("'token' must not contain whitespace or control characters")

    heartbeat_s = None
    if "heartbeat_s" in raw:
        heartbeat_s = _number(raw, "heartbeat_s", fail, low=0.05, high=3600)
    backoff_max_s = DEFAULT_BACKOFF_MAX_S
    if "backoff_max_s" in raw:
        backoff_max_s = _number(raw, "backoff_max_s", fail, low=0.5, high=3600)

    if "state_dir" in raw:
        state_dir = _string(raw, "state_dir", fail)
        # a relative state_dir is taken relative to the config file, not to whatever cwd we got
        state_dir = os.path.join(os.path.dirname(path), os.path.expanduser(state_dir))
    else:
        state_dir = default_state_dir(path)

    log_level = "INFO"
    if "log_level" in raw:
        log_level = _string(raw, "log_level", fail).upper()
        if log_level not in LOG_LEVELS:
            raise fail(f"'log_level' must be one of {', '.join(LOG_LEVELS)}, got {raw['log_level']!r}")

    release_public_key = None
    if "release_public_key" in raw:
        from agent.signing import public_key_is_valid

        release_public_key = _string(raw, "release_public_key", fail)
        if not public_key_is_valid(release_public_key):
            raise fail("'release_public_key' must be the base64 of a 32-byte ed25519 public key")
    allow_unsigned = raw.get("allow_unsigned_updates", False)
    if not isinstance(allow_unsigned, bool):
        raise fail(f"'allow_unsigned_updates' must be true or false, got {allow_unsigned!r}")
    probation_s = DEFAULT_PROBATION_S
    if "probation_s" in raw:
        probation_s = _number(raw, "probation_s", fail, low=0.5, high=86400)

    server_ca = None
    if "server_ca" in raw:
        server_ca = _ca_file(raw, path, parts.scheme, fail)

    restart_mode = "exec"
    if "restart_mode" in raw:
        restart_mode = _string(raw, "restart_mode", fail).lower()
        if restart_mode not in RESTART_MODES:
            raise fail(f"'restart_mode' must be one of {', '.join(RESTART_MODES)}, got {raw['restart_mode']!r}")

    return AgentConfig(
        path=path,
        server_url=server_url.rstrip("/"),
        token=token,
        heartbeat_s=heartbeat_s,
        backoff_max_s=backoff_max_s,
        state_dir=os.path.abspath(state_dir),
        log_level=log_level,
        release_public_key=release_public_key,
        allow_unsigned_updates=allow_unsigned,
        probation_s=probation_s,
        server_ca=server_ca,
        restart_mode=restart_mode,
    )


def default_state_dir(config_path: str) -> str:
    """Return the zipapp's own directory, or the config file's directory when run from source."""
    program = program_path()
    return os.path.dirname(program) if program else os.path.dirname(os.path.abspath(config_path))


def _ca_file(raw: dict, path: str, scheme: str, fail) -> str:
    """Validate ``server_ca``: a readable PEM file of CA certificates, for a ``wss://`` server."""
    import ssl

    from agent.tls import client_context

    # relative to the config file, as state_dir is
    ca = os.path.abspath(os.path.join(os.path.dirname(path), os.path.expanduser(_string(raw, "server_ca", fail))))
    if scheme != "wss":
        raise fail(f"'server_ca' is set but 'server_url' is not wss:// (a plain link checks no certificate): {ca}")
    if not os.path.isfile(ca):
        raise fail(f"'server_ca' {ca}: {'not a file' if os.path.exists(ca) else 'no such file'}")
    try:
        client_context(ca)
    except ssl.SSLError as exc:
        raise fail(f"'server_ca' {ca}: not a PEM CA certificate file ({exc.reason or exc})") from None
    except OSError as exc:
        raise fail(f"'server_ca' {ca}: cannot read it: {exc.strerror or exc}") from None
    return ca


def _string(raw: dict, key: str, fail) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise fail(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise fail(f"{key!r} must not be empty")
    return value.strip()


def _number(raw: dict, key: str, fail, *, low: float, high: float) -> float:
    value = raw[key]
    # bool is an int subclass; "heartbeat_s = true" is a mistake, not 1 second
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"{key!r} must be a number of seconds, got {value!r}")
    if not low <= value <= high:
        raise fail(f"{key!r} must be between {low:g} and {high:g} seconds, got {value!r}")
    return float(value)
