"""WSGI entry point for any WSGI server: the admin plane only.

The agent plane needs werkzeug's server (flask-sock reads the raw socket) and the background
jobs need exactly one scheduler per deployment; `restic-manager serve` provides both.
"""

from app import create_app
from app.serve import PlaneMiddleware

app = create_app()
app.wsgi_app = PlaneMiddleware(app.wsgi_app, "admin")
