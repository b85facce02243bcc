"""The agent plane's request log: werkzeug's line, in colour only when it goes to a terminal.

werkzeug's request handler wraps the request line in ANSI colour codes (bold for 1xx, yellow
for 404, red for 4xx...) wherever the log goes; written to a file or the journal they show up
as ``\\x1b[33m`` litter. :class:`RequestLogHandler` keeps werkzeug's line and drops the colour
unless every handler the ``werkzeug`` logger writes through is a terminal.
"""

from __future__ import annotations

import logging
import sys

from werkzeug.serving import WSGIRequestHandler
from werkzeug.urls import uri_to_iri

WERKZEUG_LOGGER = "werkzeug"


def log_goes_to_terminal(logger_name: str = WERKZEUG_LOGGER) -> bool:
    """True when every handler a record of ``logger_name`` reaches writes to a terminal."""
    streams = []
    logger: logging.Logger | None = logging.getLogger(logger_name)
    while logger is not None:
        for handler in logger.handlers:
            streams.append(getattr(handler, "stream", None))
        if not logger.propagate:
            break
        logger = logger.parent
    if not streams:  # werkzeug adds its own stderr handler on first use
        streams = [sys.stderr]
    return all(s is not None and hasattr(s, "isatty") and s.isatty() for s in streams)


class RequestLogHandler(WSGIRequestHandler):
    """werkzeug's request handler whose request log carries no colour codes off a terminal."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if log_goes_to_terminal():
            super().log_request(code, size)
            return
        try:
            msg = f"{self.command} {uri_to_iri(self.path)} {self.request_version}"
        except AttributeError:  # path isn't set if the request line was bad
            msg = self.requestline
        self.log("info", '"%s" %s %s', msg.translate(self._control_char_table), str(code), size)
