"""The user roles: here, not in app/models.py, so the command line's ``--role`` choices need no models."""

ROLES = ("admin", "viewer")
