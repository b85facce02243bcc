"""Configuration: three layers, strict parsing, loud on bad values."""

import pytest

from app import create_app
from app.config import ConfigError, from_env, parse_addr


@pytest.mark.parametrize(
    "var,value,fragment",
    [
        ("RM_UPDATE_TIMEOUT", "abc", "RM_UPDATE_TIMEOUT='abc': expected a number"),
        ("RM_UPDATE_TIMEOUT", "0", "RM_UPDATE_TIMEOUT='0': must be at least 1.0"),
        ("RM_UPDATE_TIMEOUT", "nan", "must be at least"),
        ("RM_HTTP_ADDR", "8080", "RM_HTTP_ADDR='8080': expected HOST:PORT"),
        ("RM_AGENT_ADDR", "127.0.0.1:http", "port 'http' is not a number"),
        ("RM_AGENT_ADDR", "127.0.0.1:70000", "port must be 0-65535"),
        ("RM_DATABASE_URL", "mysql://x", "only sqlite:/// and postgresql+psycopg://"),
        ("RM_SESSION_COOKIE_SECURE", "maybe", "expected true/false"),
        ("RM_SECRET_KEY", "  ", "RM_SECRET_KEY is set but empty"),
        ("RM_AGENT_HANDSHAKE_TIMEOUT_S", "0", "RM_AGENT_HANDSHAKE_TIMEOUT_S='0': must be at least 0.1"),
        ("RM_AGENT_HANDSHAKE_TIMEOUT_S", "ten", "expected a number"),
        ("RM_AGENT_MAX_PENDING", "0", "RM_AGENT_MAX_PENDING='0': must be at least 1"),
        ("RM_AGENT_MAX_PENDING", "2.5", "expected a whole number"),
        ("RM_AGENT_CLOSE_TIMEOUT_S", "-1", "RM_AGENT_CLOSE_TIMEOUT_S='-1': must be at least 0.1"),
        ("RM_MAX_BODY_KIB", "0", "RM_MAX_BODY_KIB='0': must be at least 1"),
        ("RM_MAX_BODY_KIB", "1M", "RM_MAX_BODY_KIB='1M': expected a whole number"),
    ],
)
def test_a_bad_environment_value_names_the_variable(var, value, fragment):
    with pytest.raises(ConfigError) as e:
        from_env({var: value})
    assert fragment in str(e.value)


def test_environment_values_are_parsed_into_config():
    cfg = from_env({"RM_UPDATE_TIMEOUT": "30", "RM_HTTP_ADDR": "0.0.0.0:9000", "RM_SESSION_COOKIE_SECURE": "yes"})
    assert cfg == {"UPDATE_TIMEOUT": 30.0, "HTTP_ADDR": ("0.0.0.0", 9000), "SESSION_COOKIE_SECURE": True}


def test_the_agent_plane_bounds_are_parsed_into_config():
    cfg = from_env(
        {"RM_AGENT_HANDSHAKE_TIMEOUT_S": "2.5", "RM_AGENT_MAX_PENDING": "64", "RM_AGENT_CLOSE_TIMEOUT_S": "1"}
    )
    assert cfg == {"AGENT_HANDSHAKE_TIMEOUT_S": 2.5, "AGENT_MAX_PENDING": 64, "AGENT_CLOSE_TIMEOUT_S": 1.0}


def test_the_body_limit_is_flasks_max_content_length(tmp_path):
    app = create_app(
        {"INSTANCE_PATH": str(tmp_path), "SQLALCHEMY_DATABASE_URI": "sqlite://", "SECRET_KEY": "x"},
        environ={"RM_MAX_BODY_KIB": "64"},
    )
    assert app.config["MAX_CONTENT_LENGTH"] == 64 * 1024
    assert create_app(
        {"INSTANCE_PATH": str(tmp_path), "SQLALCHEMY_DATABASE_URI": "sqlite://", "SECRET_KEY": "x"}, environ={}
    ).config["MAX_CONTENT_LENGTH"] == (1024 * 1024)


def test_postgres_urls_use_psycopg3():
    assert from_env({"RM_DATABASE_URL": "postgresql://u@h/db"})["SQLALCHEMY_DATABASE_URI"] == (
        "postgresql+psycopg://u@h/db"
    )


def test_ipv6_addresses_parse():
    assert parse_addr("X", "[::1]:8081") == ("::1", 8081)


def test_layers_apply_in_order_defaults_env_then_test_config(tmp_path):
    inst = tmp_path / "inst"
    inst.mkdir()
    (inst / "config.py").write_text("UPDATE_TIMEOUT = 10.0\nHEARTBEAT_S = 3.0\nFLEET_TICK_S = 7.0\n")
    app = create_app(
        {"INSTANCE_PATH": str(inst), "FLEET_TICK_S": 1.0},
        environ={"RM_HEARTBEAT_S": "4", "RM_SECRET_KEY": "k"},
    )
    assert app.config["UPDATE_TIMEOUT"] == 10.0  # instance file over default
    assert app.config["HEARTBEAT_S"] == 4.0  # environment over instance file
    assert app.config["FLEET_TICK_S"] == 1.0  # test config over everything
    assert app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///" + str(inst))


def test_the_secret_key_is_generated_once_and_kept(tmp_path):
    a = create_app({"INSTANCE_PATH": str(tmp_path)}, environ={})
    b = create_app({"INSTANCE_PATH": str(tmp_path)}, environ={})
    assert a.config["SECRET_KEY"] == b.config["SECRET_KEY"] and len(a.config["SECRET_KEY"]) == 64
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(app):
    from app.extensions import db

    with db.engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            pytest.skip("SQLite only")
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 15000


def test_production_hashes_passwords_with_scrypt_and_only_tests_lower_it(tmp_path, app, cast):
    from app.models import User

    prod = create_app({"INSTANCE_PATH": str(tmp_path / "prod")}, environ={})
    assert prod.config["PASSWORD_HASH_METHOD"] == "scrypt"
    with prod.app_context():
        user = User(username="u", role="viewer")
        user.set_password("s3cret-pass")
    assert user.password_hash.startswith("scrypt:")
    assert user.check_password("s3cret-pass") and not user.check_password("wrong")

    # The test configuration's cheap method, and a stored scrypt hash still checks under it.
    assert cast.admin.password_hash.startswith("pbkdf2:sha256:1$")
    assert cast.admin.check_password("admin-pass-123")
    assert user.check_password("s3cret-pass")


def tls_env(tmp_path, cert, key):
    env = {"RM_SECRET_KEY": "k", "RM_INSTANCE_PATH": str(tmp_path / "inst")}
    if cert is not None:
        env["RM_AGENT_TLS_CERT"] = cert
    if key is not None:
        env["RM_AGENT_TLS_KEY"] = key
    return env


def test_agent_tls_needs_both_the_certificate_and_the_key(tmp_path, pki):
    with pytest.raises(ConfigError, match="RM_AGENT_TLS_CERT is set but RM_AGENT_TLS_KEY is not"):
        create_app(environ=tls_env(tmp_path, pki.server.cert, None))
    with pytest.raises(ConfigError, match="RM_AGENT_TLS_KEY is set but RM_AGENT_TLS_CERT is not"):
        create_app(environ=tls_env(tmp_path, None, pki.server.key))


@pytest.mark.parametrize(
    "which,fragment",
    [
        ("missing-cert", "RM_AGENT_TLS_CERT='{missing}': no such file"),
        ("missing-key", "RM_AGENT_TLS_KEY='{missing}': no such file"),
        ("cert-is-a-key", "RM_AGENT_TLS_CERT='{server_key}': not a PEM certificate"),
        ("key-is-a-cert", "RM_AGENT_TLS_KEY='{server_cert}': not an unencrypted PEM private key"),
        ("key-of-another-cert", "RM_AGENT_TLS_KEY='{foreign_key}': does not match the certificate"),
    ],
)
def test_a_bad_agent_tls_file_stops_start_up_naming_the_variable(tmp_path, pki, which, fragment):
    missing = str(tmp_path / "nope.pem")
    cert, key = {
        "missing-cert": (missing, pki.server.key),
        "missing-key": (pki.server.cert, missing),
        "cert-is-a-key": (pki.server.key, pki.server.key),
        "key-is-a-cert": (pki.server.cert, pki.server.cert),
        "key-of-another-cert": (pki.server.cert, pki.foreign.key),
    }[which]
    with pytest.raises(ConfigError) as e:
        create_app(environ=tls_env(tmp_path, cert, key))
    expected = fragment.format(
        missing=missing, server_key=pki.server.key, server_cert=pki.server.cert, foreign_key=pki.foreign.key
    )
    assert expected in str(e.value)


def test_a_good_certificate_and_key_give_a_tls_1_2_server_context(tmp_path, pki):
    import ssl

    from app.config import agent_tls_context

    app = create_app(environ=tls_env(tmp_path, pki.server.cert, pki.server.key))
    ctx = agent_tls_context(app.config)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert agent_tls_context({"AGENT_TLS_CERT": None, "AGENT_TLS_KEY": None}) is None
