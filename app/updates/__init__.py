"""Agent self-update: release artifacts, single-host dispatch, the watcher, and fleet rollouts.

One operation here touches host, job, alert, audit and the live socket, so it lives in its own
capability package rather than in a view or a model.
"""

from __future__ import annotations

from flask import Flask

from .inflight import InFlightRegistry


def init_app(app: Flask) -> None:
    app.extensions["rm.inflight"] = InFlightRegistry()
