"""How the agent trusts the server: one TLS context (agent.tls) for the link and the download,
verified against the pinned ``server_ca`` or the system store, host name checked.

The link runs end to end in tests/e2e/test_agent_tls.py, the download against a real https
server in test_agent_updater.py (``test_an_https_download_…``), both with the run's test
certificates (tests/support/pki.py).
"""

from __future__ import annotations

import ssl

from agent.tls import client_context


def test_the_client_context_pins_only_the_given_ca_and_checks_host_names(pki):
    pinned = client_context(pki.ca)
    assert pinned.check_hostname and pinned.verify_mode == ssl.CERT_REQUIRED
    assert pinned.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in pinned.get_ca_certs()] == [((("commonName", "restic-manager test CA"),),)]
    system = client_context(None)
    assert system.check_hostname and system.verify_mode == ssl.CERT_REQUIRED
