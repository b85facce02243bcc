"""The admin pages: dashboard, hosts, host detail (with the update button), alerts, audit."""

from flask import Blueprint

bp = Blueprint("main", __name__)

from . import filters, fleet, notifications, views, windows  # noqa: E402,F401  (routes and filters register on bp)
