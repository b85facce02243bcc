"""The agent plane's request log: werkzeug's colours only on a terminal, never in a log file."""

from __future__ import annotations

import io
import logging

import pytest
import requests

from app.agents.requestlog import log_goes_to_terminal
from tests.support.live import ServerProcess

pytestmark = pytest.mark.timeout(60)


def test_the_request_log_written_to_a_file_has_no_colour_codes(tmp_path, database_url, app):
    server = ServerProcess(str(tmp_path / "server"), database_url, "2.0.0").start()  # its output goes to a file
    try:
        base = f"http://127.0.0.1:{server.agent_port}"
        assert requests.get(base + "/agent/install.sh", timeout=10).status_code == 200
        assert requests.get(base + "/agent/no-such-thing", timeout=10).status_code == 404  # yellow on a terminal
        assert requests.get(base + "/agent/download/2.0.0", timeout=10).status_code == 401  # bold red on one
    finally:
        server.stop()
    log = server.log()
    assert '"GET /agent/install.sh HTTP/1.1" 200' in log
    assert '"GET /agent/no-such-thing HTTP/1.1" 404' in log
    assert '"GET /agent/download/2.0.0 HTTP/1.1" 401' in log
    assert "\x1b[" not in log


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def werkzeug_logger():
    logger = logging.getLogger("werkzeug")
    saved = logger.handlers[:], logger.propagate
    yield logger
    logger.handlers[:], logger.propagate = saved


def test_colour_is_kept_only_when_every_handler_is_a_terminal(werkzeug_logger, tmp_path):
    werkzeug_logger.handlers[:] = [logging.StreamHandler(_Terminal())]
    werkzeug_logger.propagate = False
    assert log_goes_to_terminal()
    werkzeug_logger.handlers.append(logging.FileHandler(tmp_path / "log"))
    assert not log_goes_to_terminal()
    werkzeug_logger.handlers[:] = [logging.StreamHandler(io.StringIO())]
    assert not log_goes_to_terminal()
    for h in werkzeug_logger.handlers:
        h.close()
