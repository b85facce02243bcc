"""/hosts/new: an admin adds a host and sees its token and install command once."""

from app.extensions import db
from app.models import AuditEvent, Host
from tests.web.helpers import bearer


def test_the_add_host_form_renders_for_admins(as_admin):
    r = as_admin.get("/hosts/new")
    assert r.status_code == 200 and b'name="name"' in r.data


def test_it_adds_a_host_and_shows_the_token_and_install_command_once(as_admin, app):
    r = as_admin.post("/hosts/new", data={"name": "mail-1"})
    assert r.status_code == 201
    html = r.get_data(as_text=True)
    token = html.split('id="agent-token">')[1].split("<")[0]
    assert token.startswith("rma_")
    assert (
        "curl -fsSL http://127.0.0.1:8081/agent/install.sh | sudo sh -s -- "
        f"--server ws://127.0.0.1:8081 --token {token}"
    ) in html
    db.session.expire_all()
    host = Host.by_token(token)
    assert host is not None and host.name == "mail-1"
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "host.enrolled"))
    assert ev.target == "mail-1" and ev.actor == "admin"
    # the token is never shown again
    assert token not in as_admin.get(f"/hosts/{host.id}").get_data(as_text=True)


def test_the_install_command_uses_the_public_agent_url_when_configured(as_admin, app):
    app.config["PUBLIC_AGENT_URL"] = "https://agents.example.org/"
    html = as_admin.post("/hosts/new", data={"name": "mail-2"}).get_data(as_text=True)
    assert "curl -fsSL https://agents.example.org/agent/install.sh" in html
    assert "--server wss://agents.example.org --token" in html


def test_the_install_command_uses_https_and_wss_when_the_agent_plane_serves_tls(as_admin, app, pki):
    app.config.update(AGENT_TLS_CERT=pki.server.cert, AGENT_TLS_KEY=pki.server.key)
    html = as_admin.post("/hosts/new", data={"name": "mail-3"}).get_data(as_text=True)
    assert (
        "curl -fsSL https://127.0.0.1:8081/agent/install.sh | sudo sh -s -- --server wss://127.0.0.1:8081 --token"
        in html
    )
    app.config["PUBLIC_AGENT_URL"] = "https://agents.example.org:8443"  # still wins when set
    html = as_admin.post("/hosts/new", data={"name": "mail-4"}).get_data(as_text=True)
    assert "curl -fsSL https://agents.example.org:8443/agent/install.sh" in html
    assert "--server wss://agents.example.org:8443 --token" in html


def test_it_rejects_an_invalid_name(as_admin):
    r = as_admin.post("/hosts/new", data={"name": "bad name!"})
    assert r.status_code == 400
    assert db.session.scalar(db.select(Host).where(Host.name == "bad name!")) is None


def test_it_rejects_a_duplicate_name(as_admin, cast):
    r = as_admin.post("/hosts/new", data={"name": "web-1"})
    assert r.status_code == 409 and b"already exists" in r.data


def test_viewers_cannot_add_hosts(as_viewer):
    assert as_viewer.get("/hosts/new").status_code == 403
    assert as_viewer.post("/hosts/new", data={"name": "x"}).status_code == 403
    assert db.session.scalar(db.select(Host).where(Host.name == "x")) is None


def test_add_host_refuses_other_methods(as_admin):
    assert as_admin.delete("/hosts/new").status_code == 405


def test_without_a_release_key_the_enrolment_page_warns_the_agent_will_never_update_itself(as_admin, app):
    html = as_admin.post("/hosts/new", data={"name": "mail-3"}).get_data(as_text=True)
    assert 'id="no-release-key-warning"' in html and "will never update itself" in html
    assert "RM_RELEASE_PUBLIC_KEY" in html and "--release-key" not in html


def test_with_a_release_key_the_install_command_pins_it_and_nothing_warns(as_admin, app):
    from agent.signing import generate_keypair

    app.config["RELEASE_PUBLIC_KEY"] = generate_keypair()[1]
    html = as_admin.post("/hosts/new", data={"name": "mail-4"}).get_data(as_text=True)
    assert f"--release-key {app.config['RELEASE_PUBLIC_KEY']}" in html
    assert "no-release-key-warning" not in html


def test_the_api_says_the_same_in_its_warning_field(client, admin_token):
    r = client.post("/api/hosts", json={"name": "mail-5"}, headers=bearer(admin_token))
    assert r.status_code == 201 and "never be able to update itself" in r.get_json()["warning"]
