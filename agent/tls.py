"""How the agent trusts the server: one TLS client context, for the link and for the download.

Both the WebSocket (``wss://``) and the artifact download (``https://``) verify the server's
certificate chain and host name, against the pinned CA file ``server_ca`` when the config names
one (only that CA is trusted then), else against the system's store. TLS 1.2 or newer.
"""

from __future__ import annotations

import ssl


def client_context(server_ca: str | None = None) -> ssl.SSLContext:
    """Return a context that verifies the server against ``server_ca`` or the system store.

    :raise OSError: ``server_ca`` cannot be read. :raise ssl.SSLError: it holds no PEM certificate.
    """
    # cafile given: only it is loaded, not the system store (that is what pinning means).
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_trust(server_ca: str | None) -> str:
    """Say what the agent trusts, for a log line about a refused certificate."""
    return f"the pinned CA in {server_ca} (server_ca)" if server_ca else "the system's CA store (no server_ca set)"
