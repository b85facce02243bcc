"""Configuration in three layers: defaults, then ``RM_*`` environment / instance file, then tests.

Values from the environment are parsed strictly: a bad value stops start-up with a
:class:`ConfigError` that names the variable, instead of crashing at first use.
"""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def parse_addr(name: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{name}={value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: port {port!r} is not a number") from None
    if not 0 <= port_n <= 65535:
        raise ConfigError(f"{name}={value!r}: port must be 0-65535")
    return host, port_n


def parse_int(name: str, value: str, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected a whole number") from None
    if n < minimum or (maximum is not None and n > maximum):
        hi = "" if maximum is None else f" and at most {maximum}"
        raise ConfigError(f"{name}={value!r}: must be at least {minimum}{hi}")
    return n


def parse_float(name: str, value: str, minimum: float = 0.0) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected a number") from None
    if not n >= minimum:  # also rejects NaN
        raise ConfigError(f"{name}={value!r}: must be at least {minimum}")
    return n


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={value!r}: expected true/false")


def parse_str(name: str, value: str) -> str:
    if not value.strip():
        raise ConfigError(f"{name} is set but empty")
    return value


def parse_db_url(name: str, value: str) -> str:
    if not value.startswith(("sqlite:", "postgresql")):
        raise ConfigError(f"{name}={value!r}: only sqlite:/// and postgresql+psycopg:// URLs are supported")
    if value.startswith("postgresql://") or value.startswith("postgres://"):
        # psycopg 3 is the driver we ship; SQLAlchemy's default for this scheme is psycopg2.
        value = "postgresql+psycopg://" + value.split("://", 1)[1]
    return value


def parse_public_key(name: str, value: str) -> str:
    from agent.signing import public_key_is_valid

    if not public_key_is_valid(value.strip()):
        raise ConfigError(f"{name}: not the base64 of a 32-byte Ed25519 public key")
    return value.strip()


def parse_file(name: str, value: str) -> str:
    """A path to a readable file, made absolute (the server may change its working directory)."""
    path = os.path.abspath(os.path.expanduser(parse_str(name, value)))
    if not os.path.isfile(path):
        raise ConfigError(f"{name}={value!r}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name}={value!r}: not readable by this user")
    return path


def agent_tls_context(config: Mapping[str, Any]) -> ssl.SSLContext | None:
    """Build the agent plane's server TLS context (TLS 1.2 or newer) from ``AGENT_TLS_CERT`` and
    ``AGENT_TLS_KEY``, or return None when neither is set.

    :raise ConfigError: only one is set, or a file is missing, not PEM, or the key does not match
        the certificate; the message names the variable.
    """
    cert, key = config.get("AGENT_TLS_CERT"), config.get("AGENT_TLS_KEY")
    if not cert and not key:
        return None
    if not (cert and key):
        have, missing = ("RM_AGENT_TLS_CERT", "RM_AGENT_TLS_KEY") if cert else ("RM_AGENT_TLS_KEY", "RM_AGENT_TLS_CERT")
        raise ConfigError(f"{have} is set but {missing} is not: set both (or neither) to serve agents over TLS")
    cert, key = parse_file("RM_AGENT_TLS_CERT", cert), parse_file("RM_AGENT_TLS_KEY", key)
    _check_pem(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"RM_AGENT_TLS_KEY={key!r}: does not match the certificate in RM_AGENT_TLS_CERT ({exc.reason or exc})"
        ) from None
    return ctx


def _check_pem(cert: str, key: str) -> None:
    """Parse each file on its own, so an error names the variable whose file is wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(cert, "rb") as f:
        data = f.read()
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
    except ValueError:
        raise ConfigError(f"RM_AGENT_TLS_CERT={cert!r}: not a PEM certificate (chain)") from None
    with open(key, "rb") as f:
        data = f.read()
    try:
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ConfigError(f"RM_AGENT_TLS_KEY={key!r}: not an unencrypted PEM private key") from None


def parse_http_url(name: str, value: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL; a trailing slash is dropped."""
    from urllib.parse import urlsplit

    v = value.strip()
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The value is not echoed: a webhook URL may carry a secret in its path.
        raise ConfigError(f"{name}: expected an http:// or https:// URL with a host")
    return v.rstrip("/") if not parts.query else v


def parse_notify_urls(name: str, value: str) -> list[str]:
    """Apprise URLs separated by commas or white space; each must be one Apprise can load."""
    import apprise

    urls = value.replace(",", " ").split()
    for i, url in enumerate(urls, 1):
        if apprise.Apprise.instantiate(url) is None:
            # Not echoed: an Apprise URL carries its service's token or password.
            scheme = url.partition("://")[0] if "://" in url else "(none)"
            raise ConfigError(f"{name}: URL #{i} (scheme {scheme!r}) is not one Apprise can load")
    return urls


def parse_webhook_secret(name: str, value: str) -> str:
    if len(value.strip()) < 16:
        raise ConfigError(f"{name}: must be at least 16 characters (e.g. `openssl rand -hex 32`)")
    return value.strip()


def check(config: Mapping[str, Any]) -> None:
    """Checks across variables, after every layer is applied."""
    if config.get("WEBHOOK_URL") and not config.get("WEBHOOK_SECRET"):
        raise ConfigError("RM_WEBHOOK_URL is set but RM_WEBHOOK_SECRET is not: webhook calls are always signed")
    beat, expiry = config.get("INSTANCE_HEARTBEAT_S", 1.0), config.get("INSTANCE_EXPIRY_S", 5.0)
    if expiry < 2 * beat:
        raise ConfigError(
            f"RM_INSTANCE_EXPIRY_S={expiry:g} must be at least twice RM_INSTANCE_HEARTBEAT_S={beat:g}: "
            "one late heartbeat must not declare a live instance dead"
        )


# env var -> (config key, parser)
ENV: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "RM_DATABASE_URL": ("SQLALCHEMY_DATABASE_URI", parse_db_url),
    "RM_HTTP_ADDR": ("HTTP_ADDR", parse_addr),
    "RM_AGENT_ADDR": ("AGENT_ADDR", parse_addr),
    "RM_SECRET_KEY": ("SECRET_KEY", parse_str),
    "RM_UPDATE_TIMEOUT": ("UPDATE_TIMEOUT", lambda n, v: parse_float(n, v, 1.0)),
    "RM_HEARTBEAT_S": ("HEARTBEAT_S", lambda n, v: parse_float(n, v, 0.05)),
    "RM_HEARTBEAT_TIMEOUT": ("HEARTBEAT_TIMEOUT", lambda n, v: parse_float(n, v, 0.1)),
    "RM_OFFLINE_SWEEP_S": ("OFFLINE_SWEEP_S", lambda n, v: parse_float(n, v, 0.1)),
    "RM_PRESENCE_FLUSH_S": ("PRESENCE_FLUSH_S", lambda n, v: parse_float(n, v, 0.05)),
    "RM_VERSION": ("VERSION", parse_str),
    "RM_PUBLIC_AGENT_URL": ("PUBLIC_AGENT_URL", parse_str),
    "RM_SESSION_COOKIE_SECURE": ("SESSION_COOKIE_SECURE", parse_bool),
    "RM_LOGIN_MAX_FAILURES": ("LOGIN_MAX_FAILURES", lambda n, v: parse_int(n, v, 1)),
    "RM_LOGIN_LOCKOUT_S": ("LOGIN_LOCKOUT_S", lambda n, v: parse_float(n, v, 0.0)),
    "RM_WS_ALLOWED_ORIGINS": ("WS_ALLOWED_ORIGINS", lambda n, v: [o.strip() for o in v.split(",") if o.strip()]),
    "RM_AGENT_BACKLOG": ("AGENT_BACKLOG", lambda n, v: parse_int(n, v, 16, 65535)),
    "RM_AGENT_HANDSHAKE_TIMEOUT_S": ("AGENT_HANDSHAKE_TIMEOUT_S", lambda n, v: parse_float(n, v, 0.1)),
    "RM_AGENT_MAX_PENDING": ("AGENT_MAX_PENDING", lambda n, v: parse_int(n, v, 1, 100000)),
    "RM_AGENT_MAX_ACTIVE": ("AGENT_MAX_ACTIVE", lambda n, v: parse_int(n, v, 0, 100000)),
    "RM_AGENT_CLOSE_TIMEOUT_S": ("AGENT_CLOSE_TIMEOUT_S", lambda n, v: parse_float(n, v, 0.1)),
    "RM_AGENT_TLS_CERT": ("AGENT_TLS_CERT", parse_file),
    "RM_AGENT_TLS_KEY": ("AGENT_TLS_KEY", parse_file),
    "RM_THREAD_STACK_KIB": ("THREAD_STACK_KIB", lambda n, v: parse_int(n, v, 0, 65536)),
    "RM_SWITCH_INTERVAL": ("SWITCH_INTERVAL", lambda n, v: parse_float(n, v, 0.0001)),
    "RM_FLEET_TICK_S": ("FLEET_TICK_S", lambda n, v: parse_float(n, v, 0.05)),
    "RM_FLEET_OFFLINE_GRACE_S": ("FLEET_OFFLINE_GRACE_S", lambda n, v: parse_float(n, v, 0.0)),
    "RM_LOG_LEVEL": ("LOG_LEVEL", parse_str),
    "RM_AGENT_MSG_RATE": ("AGENT_MSG_RATE", lambda n, v: parse_float(n, v, 0.1)),
    "RM_AGENT_MSG_BURST": ("AGENT_MSG_BURST", lambda n, v: parse_float(n, v, 1.0)),
    "RM_RELEASE_SIGNING_KEY": ("RELEASE_SIGNING_KEY", parse_str),
    "RM_RELEASE_PUBLIC_KEY": ("RELEASE_PUBLIC_KEY", parse_public_key),
    "RM_DOWNLOAD_RATE_KIB": ("DOWNLOAD_RATE_KIB", lambda n, v: parse_int(n, v, 0)),
    "RM_MAX_BODY_KIB": ("MAX_BODY_KIB", lambda n, v: parse_int(n, v, 1, 1024 * 1024)),
    "RM_PUBLIC_URL": ("PUBLIC_URL", parse_http_url),
    "RM_NOTIFY_URLS": ("NOTIFY_URLS", parse_notify_urls),
    "RM_WEBHOOK_URL": ("WEBHOOK_URL", parse_http_url),
    "RM_WEBHOOK_SECRET": ("WEBHOOK_SECRET", parse_webhook_secret),
    "RM_NOTIFY_ATTEMPTS": ("NOTIFY_ATTEMPTS", lambda n, v: parse_int(n, v, 1, 20)),
    "RM_NOTIFY_BACKOFF_S": ("NOTIFY_BACKOFF_S", lambda n, v: parse_float(n, v, 0.0)),
    "RM_NOTIFY_TIMEOUT_S": ("NOTIFY_TIMEOUT_S", lambda n, v: parse_float(n, v, 0.1)),
    "RM_NOTIFY_QUEUE": ("NOTIFY_QUEUE", lambda n, v: parse_int(n, v, 1, 100000)),
    "RM_METRICS_ADDR": ("METRICS_ADDR", parse_addr),
    "RM_DB_POOL_SIZE": ("DB_POOL_SIZE", lambda n, v: parse_int(n, v, 1, 1000)),
    "RM_DB_MAX_OVERFLOW": ("DB_MAX_OVERFLOW", lambda n, v: parse_int(n, v, 0, 1000)),
    "RM_INSTANCE_HEARTBEAT_S": ("INSTANCE_HEARTBEAT_S", lambda n, v: parse_float(n, v, 0.05)),
    "RM_INSTANCE_EXPIRY_S": ("INSTANCE_EXPIRY_S", lambda n, v: parse_float(n, v, 0.2)),
}


def defaults(instance_path: str) -> dict[str, Any]:
    return {
        "SQLALCHEMY_DATABASE_URI": "sqlite:///" + os.path.join(instance_path, "restic-manager.sqlite3"),
        "SQLALCHEMY_ENGINE_OPTIONS": {},
        "HTTP_ADDR": ("127.0.0.1", 8080),
        "AGENT_ADDR": ("127.0.0.1", 8081),
        "SECRET_KEY": None,
        "UPDATE_TIMEOUT": 90.0,
        "HEARTBEAT_S": 15.0,
        "HEARTBEAT_TIMEOUT": 45.0,
        "OFFLINE_SWEEP_S": 30.0,
        "PRESENCE_FLUSH_S": None,  # heartbeats' last_seen written every this many s; None: HEARTBEAT_S / 2
        "VERSION": None,
        "PUBLIC_AGENT_URL": None,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": False,
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SAMESITE": "Lax",
        "LOGIN_MAX_FAILURES": 5,
        "LOGIN_LOCKOUT_S": 60.0,
        "PASSWORD_HASH_METHOD": "scrypt",  # werkzeug method for new password hashes; tests lower it
        "WS_ALLOWED_ORIGINS": [],
        "AGENT_BACKLOG": 4096,
        "AGENT_HANDSHAKE_TIMEOUT_S": 10.0,  # from accept until the agent token is accepted
        "AGENT_MAX_PENDING": 256,  # connections not yet authenticated; beyond it 503 + Retry-After
        "AGENT_MAX_ACTIVE": 16,  # connections doing handshake work at once per process; 0: no gate
        "AGENT_CLOSE_TIMEOUT_S": 5.0,  # wait for the peer's close frame before closing TCP
        "AGENT_TLS_CERT": None,  # PEM certificate chain: with AGENT_TLS_KEY, the agent plane serves TLS
        "AGENT_TLS_KEY": None,
        "THREAD_STACK_KIB": 512,
        "SWITCH_INTERVAL": None,  # sys.setswitchinterval for serve; None keeps Python's 0.005 s
        "FLEET_TICK_S": 5.0,
        "FLEET_OFFLINE_GRACE_S": 30.0,
        "LOG_LEVEL": "INFO",
        "DOWNLOAD_RATE_KIB": 0,
        "MAX_BODY_KIB": 1024,  # request bodies on both planes; the API's are a few hundred bytes
        "METRICS_ADDR": None,  # (host, port): also serve /metrics there, without authentication
        "AGENT_MSG_RATE": 20.0,
        "AGENT_MSG_BURST": 100.0,
        "RELEASE_SIGNING_KEY": None,
        "RELEASE_PUBLIC_KEY": None,
        "RELEASES_DIR": os.path.join(instance_path, "releases"),
        "PUBLIC_URL": None,  # how people reach this server; links in notifications use it
        "NOTIFY_URLS": [],
        "WEBHOOK_URL": None,
        "WEBHOOK_SECRET": None,
        "NOTIFY_ATTEMPTS": 5,  # per event and destination
        "NOTIFY_BACKOFF_S": 2.0,  # first pause between attempts; doubles each time
        "NOTIFY_TIMEOUT_S": 10.0,
        "NOTIFY_QUEUE": 1000,  # events waiting to be sent; beyond it new ones are dropped (logged)
        "BUILD_AGENT_ON_START": False,
        # Several instances on PostgreSQL (app/cluster.py): heartbeat period, and the silence after
        # which an instance counts as dead (its hosts offline, another may lead).
        # PostgreSQL connection pool of each process (each instance also holds two dedicated
        # connections: its listener and its leadership lock).
        "DB_POOL_SIZE": 10,
        "DB_MAX_OVERFLOW": 20,
        "INSTANCE_HEARTBEAT_S": 1.0,
        "INSTANCE_EXPIRY_S": 5.0,
        "SOCK_SERVER_OPTIONS": {"ping_interval": None, "max_message_size": 64 * 1024},
        "WTF_CSRF_TIME_LIMIT": None,
        "SQLALCHEMY_TRACK_MODIFICATIONS": False,
    }


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Parse every ``RM_*`` variable we know; raise :class:`ConfigError` on the first bad one."""
    out: dict[str, Any] = {}
    for var, (key, parser) in ENV.items():
        if var in environ:
            out[key] = parser(var, environ[var])
    return out


def ensure_secret_key(instance_path: str) -> str:
    """Return the instance's persistent secret key, generating it once."""
    path = os.path.join(instance_path, "secret_key")
    try:
        with open(path) as f:
            key = f.read().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
