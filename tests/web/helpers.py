"""Small helpers shared by the web tests."""

from __future__ import annotations

import json

from app.agents.registry import Connection
from app.extensions import db
from app.models import AuditEvent

HX = {"HX-Request": "true"}


class FakeSocket:
    """Stands in for a simple-websocket connection: records frames, answers pings if told to."""

    def __init__(self, answer_pings: bool = True):
        self.sent: list[dict] = []
        self.closed: tuple | None = None
        self.answer_pings = answer_pings
        self.conn: Connection | None = None

    def send(self, frame: str) -> None:
        env = json.loads(frame)
        self.sent.append(env)
        if env["type"] == "ping" and self.answer_pings and self.conn is not None:
            self.conn.pong(env["id"])

    def close(self, reason=None, message=None) -> None:
        self.closed = (reason, message)

    def types(self) -> list[str]:
        return [e["type"] for e in self.sent]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def audit_actions() -> list[str]:
    db.session.expire_all()
    return [e.action for e in db.session.scalars(db.select(AuditEvent).order_by(AuditEvent.id))]


def error_code(resp) -> str:
    return resp.get_json()["error"]["code"]
