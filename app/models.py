"""The data model. Constraints that guard correctness live in the schema (see migrations/)."""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import uuid

import sqlalchemy as sa
from flask import current_app, has_app_context
from flask_login import UserMixin
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload
from werkzeug.security import check_password_hash, generate_password_hash

from . import labels as host_labels
from .errors import Refusal
from .extensions import db
from .oncommit import on_commit
from .roles import ROLES
from .runtime import runtime
from .timeutil import isoformat, utcnow

DEFAULT_PASSWORD_HASH_METHOD = "scrypt"
MIN_PASSWORD_LENGTH = 8
MAX_USERNAME_LENGTH = 64
JOB_KINDS = ("update",)
JOB_STATUSES = ("running", "succeeded", "failed", "cancelled")
ALERT_KINDS = ("update_failed", "fleet_update_halted")
FLEET_STATUSES = ("scheduled", "running", "succeeded", "halted", "cancelled")
#: What a rollout is: a plain update, a retry of another's failed and skipped hosts, or a revert.
FLEET_KINDS = ("update", "retry", "revert")
#: What a rollout does about a host that is offline when its turn comes.
OFFLINE_POLICIES = ("halt", "skip", "wait")
FLEET_HOST_STATUSES = ("pending", "running", "succeeded", "failed", "skipped", "cancelled")
#: How many resolved alerts a listing shows.
RESOLVED_ALERTS_LIMIT = 50


_SESSION_ID = re.compile(r"(?P<id>[0-9]{1,18}):(?P<version>[0-9]{1,18})")


def _in(col: str, values: tuple[str, ...]) -> str:
    return f"{col} IN ({', '.join(repr(v) for v in values)})"


def password_hash_method() -> str:
    """The werkzeug hash method for new passwords: ``PASSWORD_HASH_METHOD`` (scrypt by default).

    Only the test configuration lowers it (a cheap method per persona); a stored hash names its own
    method, so checking a password never depends on this setting.
    """
    method = current_app.config.get("PASSWORD_HASH_METHOD") if has_app_context() else None
    return method or DEFAULT_PASSWORD_HASH_METHOD


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def new_uuid() -> str:
    return str(uuid.uuid4())


class User(UserMixin, db.Model):
    __tablename__ = "users"
    __table_args__ = (sa.CheckConstraint(_in("role", ROLES), name="role"),)

    id = sa.Column(sa.Integer, primary_key=True)
    username = sa.Column(sa.String(MAX_USERNAME_LENGTH), nullable=False, unique=True)
    password_hash = sa.Column(sa.String(256), nullable=False)
    role = sa.Column(sa.String(16), nullable=False, default="viewer")
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    #: Every session carries the version it was made at; bumping it ends all of them at once.
    session_version = sa.Column(sa.Integer, nullable=False, default=0)
    disabled_at = sa.Column(sa.DateTime)

    @classmethod
    def create(cls, username: str, password: str, role: str = "viewer", actor: str | None = None) -> User:
        """Add a user to the session (the caller commits); the one way accounts are made.

        Raises :class:`ValueError` (its message fit to show) for an empty or too long name, an
        unknown role, a short password or a name already taken. With ``actor``, the creation is
        audited (``user.created``) in the same transaction.
        """
        if not username or len(username) > MAX_USERNAME_LENGTH:
            raise ValueError(f"a username is 1 to {MAX_USERNAME_LENGTH} characters")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        if cls.by_username(username) is not None:
            raise ValueError(f"user {username!r} already exists")
        user = cls(username=username, role=role)
        user.set_password(password)
        db.session.add(user)
        if actor is not None:
            AuditEvent.record(actor, "user.created", username, role=role)
        return user

    @classmethod
    def by_username(cls, username: str) -> User | None:
        return db.session.scalar(sa.select(cls).where(cls.username == username))

    def set_password(self, password: str) -> None:
        """Store a hash of ``password``; raise :class:`ValueError` if it is shorter than the minimum."""
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters")
        self.password_hash = generate_password_hash(password, method=password_hash_method())
        self.end_sessions()

    def get_id(self) -> str:
        """What Flask-Login keeps in the session: the id and the session version (see ``load``)."""
        return f"{self.id}:{self.session_version or 0}"

    @property
    def is_active(self) -> bool:
        return self.disabled_at is None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @classmethod
    def load(cls, session_id: str) -> User | None:
        """The user a session's ``id:version`` names, if the version is current and the user enabled.

        A session made before a logout, a password or role change, or a disable carries an older
        version and loads nobody; so does a session from before versions existed (no ``:``).
        """
        m = _SESSION_ID.fullmatch(session_id or "")
        if m is None:
            return None
        user = db.session.get(cls, int(m["id"]))
        if user is None or not user.is_active or user.session_version != int(m["version"]):
            return None
        return user

    def end_sessions(self) -> None:
        """Invalidate every session of this user, on every browser, from the next request on."""
        self.session_version = (self.session_version or 0) + 1

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    def set_role(self, role: str, actor: str) -> bool:
        """Change the role (ending the user's sessions); refuse to demote the last admin."""
        if role not in ROLES:
            raise Refusal(400, "invalid_role", f"role must be one of {', '.join(ROLES)}")
        if role == self.role:
            return False
        if self.is_admin:
            self._refuse_if_last_admin("demote")
        old, self.role = self.role, role
        self.end_sessions()
        AuditEvent.record(actor, "user.role_changed", self.username, old=old, new=role)
        return True

    def disable(self, actor: str) -> bool:
        """Disable the account: its sessions end and its API tokens stop working (401)."""
        if not self.is_active:
            return False
        if self.is_admin:
            self._refuse_if_last_admin("disable")
        self.disabled_at = utcnow()
        self.end_sessions()
        AuditEvent.record(actor, "user.disabled", self.username, user_id=self.id)
        return True

    def enable(self, actor: str) -> bool:
        if self.is_active:
            return False
        self.disabled_at = None
        AuditEvent.record(actor, "user.enabled", self.username, user_id=self.id)
        return True

    def remove(self, actor: str) -> None:
        """Delete the account and its API tokens; refuse to delete the last enabled admin."""
        if self.is_admin and self.is_active:
            self._refuse_if_last_admin("delete")
        tokens = db.session.execute(sa.delete(ApiToken).where(ApiToken.user_id == self.id)).rowcount
        AuditEvent.record(actor, "user.deleted", self.username, user_id=self.id, role=self.role, tokens=tokens)
        db.session.delete(self)

    def _refuse_if_last_admin(self, verb: str) -> None:
        """Raise unless another enabled admin remains after this one stops being one.

        The no-op UPDATE first takes the write lock (SQLite) or the admin rows' locks (PostgreSQL,
        re-checked after a concurrent commit), so two admins disabling each other at the same
        moment cannot both pass the count and leave none.
        """
        active_admin = sa.and_(User.role == "admin", User.disabled_at.is_(None))
        db.session.execute(sa.update(User).where(active_admin).values(role=User.role))
        others = db.session.scalar(sa.select(sa.func.count(User.id)).where(active_admin, User.id != self.id))
        if not others:
            raise Refusal(409, "last_admin", f"cannot {verb} {self.username}: it is the last enabled admin")

    def token_count(self) -> int:
        q = sa.select(sa.func.count(ApiToken.id)).where(ApiToken.user_id == self.id, ApiToken.revoked_at.is_(None))
        return db.session.scalar(q) or 0

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "username": self.username,
            "role": self.role,
            "created_at": isoformat(self.created_at),
            "disabled": self.disabled_at is not None,
            "disabled_at": isoformat(self.disabled_at),
        }


class ApiToken(db.Model):
    __tablename__ = "api_tokens"

    id = sa.Column(sa.Integer, primary_key=True)
    user_id = sa.Column(sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name = sa.Column(sa.String(100), nullable=False, default="")
    prefix = sa.Column(sa.String(16), nullable=False)
    token_hash = sa.Column(sa.String(64), nullable=False, unique=True)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    last_used_at = sa.Column(sa.DateTime)
    revoked_at = sa.Column(sa.DateTime)

    user = db.relationship("User")

    @classmethod
    def issue(cls, user: User, name: str = "", actor: str | None = None) -> tuple[ApiToken, str]:
        """Create a token for ``user``; return the row and the plain token (shown once).

        With ``actor``, the creation is audited (``token.created``) in the same transaction.
        """
        plain = new_token("rmt")
        tok = cls(user=user, name=name, prefix=plain[:12], token_hash=hash_token(plain))
        db.session.add(tok)
        if actor is not None:
            db.session.flush()
            AuditEvent.record(actor, "token.created", f"token {tok.prefix}", token_id=tok.id, user=user.username)
        return tok, plain

    @classmethod
    def lookup(cls, plain: str) -> ApiToken | None:
        # the user in the same statement: every API call needs both (one round trip, not two)
        tok = db.session.scalar(sa.select(cls).options(joinedload(cls.user)).where(cls.token_hash == hash_token(plain)))
        if tok is None or tok.revoked_at is not None:
            return None
        return tok

    def revoke(self, actor: str) -> bool:
        """Stop the token working (the row stays, for the record); audited once."""
        if self.revoked_at is not None:
            return False
        self.revoked_at = utcnow()
        AuditEvent.record(actor, "token.revoked", f"token {self.prefix}", token_id=self.id, user=self.user.username)
        return True

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": isoformat(self.created_at),
            "last_used_at": isoformat(self.last_used_at),
            "revoked": self.revoked_at is not None,
            "revoked_at": isoformat(self.revoked_at),
        }


class LoginThrottle(db.Model):
    """Failed logins per key (``name:<username>`` or ``addr:<address>``), for names that exist or not.

    Kept in the database, not in memory, so a lock-out survives a restart and ``users
    set-password`` / ``users enable`` can lift one from another process.
    """

    __tablename__ = "login_throttle"

    key = sa.Column(sa.String(200), primary_key=True)
    failures = sa.Column(sa.Integer, nullable=False, default=0)
    last_failure_at = sa.Column(sa.DateTime, nullable=False, index=True)
    locked_until = sa.Column(sa.DateTime)


class Instance(db.Model):
    """One ``serve`` process on PostgreSQL (docs/architecture.md#instances); SQLite mode has none.

    ``heartbeat_at`` is the database's clock, so instances on several machines compare alike.
    """

    __tablename__ = "instances"

    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(255), nullable=False)
    pid = sa.Column(sa.Integer, nullable=False)
    agent_addr = sa.Column(sa.String(255))
    started_at = sa.Column(sa.DateTime, nullable=False)
    heartbeat_at = sa.Column(sa.DateTime, nullable=False, index=True)


class Host(db.Model):
    __tablename__ = "hosts"

    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(128), nullable=False, unique=True)
    token_hash = sa.Column(sa.String(64), unique=True)
    token_prefix = sa.Column(sa.String(16))
    agent_version = sa.Column(sa.String(128))
    os = sa.Column(sa.String(64))
    arch = sa.Column(sa.String(64))
    hostname = sa.Column(sa.String(255))
    python = sa.Column(sa.String(32))
    platform = sa.Column(sa.String(64))
    capabilities = sa.Column(sa.JSON, nullable=False, default=list)
    boot_id = sa.Column(sa.String(64))
    last_seen = sa.Column(sa.DateTime)
    connected = sa.Column(sa.Boolean, nullable=False, default=False)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    revoked_at = sa.Column(sa.DateTime)
    #: ``{"key": "value"}``: what a rollout's selector and a maintenance window match on.
    labels = sa.Column(sa.JSON, nullable=False, default=dict, server_default=sa.text("'{}'"))
    #: The instance holding the agent's socket (PostgreSQL instances only; NULL in SQLite mode).
    #: No foreign key (see migration 0009): the sweep that deletes an instance clears this too.
    instance_id = sa.Column(sa.Integer, index=True)

    @classmethod
    def enrol(cls, name: str) -> tuple[Host, str]:
        """Create a host; return it and its plain agent token (shown once)."""
        plain = new_token("rma")
        host = cls(name=name, token_hash=hash_token(plain), token_prefix=plain[:12], capabilities=[])
        db.session.add(host)
        return host, plain

    @classmethod
    def by_token(cls, plain: str) -> Host | None:
        if not plain:
            return None
        return db.session.scalar(sa.select(cls).where(cls.token_hash == hash_token(plain)))

    @classmethod
    def id_and_name_by_token(cls, plain: str) -> tuple[int, str] | None:
        """The (id, name) of the host holding this token: what every agent connection asks.

        A plain row, not an ORM object: loading the whole host cost a third of the server's CPU
        per handshake in a reconnect storm (docs/capacity.md). On PostgreSQL not through the
        session either: on its own pooled connection in autocommit, one round trip (the session's
        are three, ``BEGIN``, the ``SELECT`` and the ``ROLLBACK`` of its close, each a hand-off of
        the GIL under load). SQLite's driver begins nothing for a ``SELECT``: the session it is.
        """
        if not plain:
            return None
        params = {"token_hash": hash_token(plain)}
        if db.engine.dialect.name != "postgresql":
            row = db.session.execute(_host_by_token(), params).first()
        else:
            with db.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                row = conn.execute(_host_by_token(), params).first()
        return (row.id, row.name) if row is not None else None

    def revoke(self) -> None:
        self.token_hash = None
        self.revoked_at = utcnow()
        self.connected = False

    def rotate_token(self) -> str:
        plain = new_token("rma")
        self.token_hash = hash_token(plain)
        self.token_prefix = plain[:12]
        self.revoked_at = None
        return plain

    def version_state(self, server_version: str) -> str:
        """Return ``current``, ``behind``, ``ahead`` or ``unknown`` relative to the server."""
        if not self.agent_version:
            return "unknown"
        if self.agent_version == server_version:
            return "current"
        from .versioning import is_newer

        return "ahead" if is_newer(self.agent_version, server_version) else "behind"

    def can_update(self) -> bool:
        return "update" in (self.capabilities or [])

    def matches_labels(self, wanted: dict) -> bool:
        """True when the host carries every ``key: value`` of ``wanted`` (``{}`` matches every host)."""
        return host_labels.matches(self.labels, wanted)

    def set_labels(self, labels: dict, actor: str) -> bool:
        """Replace the host's labels (already checked, see :mod:`app.labels`); audit a change.

        Return False, auditing nothing, when the labels are already these.
        """
        old = dict(self.labels or {})
        if old == labels:
            return False
        self.labels = dict(labels)
        AuditEvent.record(actor, "host.labels_changed", self.name, host_id=self.id, old=old, new=dict(labels))
        return True

    def to_dict(self, server_version: str | None = None) -> dict:
        d = {
            "id": self.id,
            "name": self.name,
            "online": bool(self.connected),
            "last_seen": isoformat(self.last_seen),
            "agent_version": self.agent_version,
            "os": self.os,
            "arch": self.arch,
            "hostname": self.hostname,
            "python": self.python,
            "platform": self.platform,
            "capabilities": list(self.capabilities or []),
            "labels": dict(self.labels or {}),
            "created_at": isoformat(self.created_at),
            "revoked": self.revoked_at is not None,
        }
        if server_version is not None:
            d["version_state"] = self.version_state(server_version)
        return d


class Job(db.Model):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        sa.CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        sa.Index(
            "uq_jobs_one_running_update",
            "host_id",
            unique=True,
            sqlite_where=sa.text("kind = 'update' AND status = 'running'"),
            postgresql_where=sa.text("kind = 'update' AND status = 'running'"),
        ),
    )

    id = sa.Column(sa.String(36), primary_key=True, default=new_uuid)
    # History outlives the host: deleting it leaves the job with host_id NULL and its name kept.
    host_id = sa.Column(sa.Integer, sa.ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    host_name = sa.Column(sa.String(128))
    kind = sa.Column(sa.String(32), nullable=False)
    status = sa.Column(sa.String(16), nullable=False, default="running")
    phase = sa.Column(sa.String(32))
    bytes_done = sa.Column(sa.BigInteger)
    bytes_total = sa.Column(sa.BigInteger)
    params = sa.Column(sa.JSON, nullable=False, default=dict)
    error = sa.Column(sa.Text)
    actor = sa.Column(sa.String(128), nullable=False, default="system")
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    updated_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    finished_at = sa.Column(sa.DateTime)
    deadline = sa.Column(sa.DateTime)

    host = db.relationship("Host")

    @property
    def target_version(self) -> str | None:
        return (self.params or {}).get("version")

    @classmethod
    def cancel_running(cls, host_id: int, reason: str, actor: str) -> str | None:
        """End the host's running update job ``cancelled`` and audit it, in the caller's transaction.

        Return the job's id, or None when none was running. Claimed with ``WHERE status =
        'running'``, so a job ending at the same moment is ended exactly once.
        """
        job = db.session.scalar(
            sa.select(cls).where(cls.host_id == host_id, cls.kind == "update", cls.status == "running")
        )
        if job is None:
            return None
        now = utcnow()
        res = db.session.execute(
            sa.update(cls)
            .where(cls.id == job.id, cls.status == "running")
            .values(status="cancelled", error=reason, finished_at=now, updated_at=now)
        )
        if not res.rowcount:
            return None
        AuditEvent.record(
            actor,
            "host.update_cancelled",
            job.host_name or str(host_id),
            host_id=host_id,
            job_id=job.id,
            version=job.target_version,
            reason=reason,
        )
        return job.id

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "host_id": self.host_id,
            "host_name": self.host_name,
            "kind": self.kind,
            "status": self.status,
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "target_version": self.target_version,
            "from_version": (self.params or {}).get("from_version"),
            "error": self.error,
            "actor": self.actor,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "finished_at": isoformat(self.finished_at),
            "deadline": isoformat(self.deadline),
        }


class JobPhase(db.Model):
    """When a job entered a phase (the watcher appends one row per phase; see the run report)."""

    __tablename__ = "job_phases"

    id = sa.Column(sa.Integer, primary_key=True)
    job_id = sa.Column(sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    phase = sa.Column(sa.String(32), nullable=False)
    at = sa.Column(sa.DateTime, nullable=False)


class Alert(db.Model):
    __tablename__ = "alerts"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", ALERT_KINDS), name="kind"),
        sa.Index(
            "uq_alerts_one_open",
            "kind",
            "dedup_key",
            unique=True,
            sqlite_where=sa.text("resolved_at IS NULL"),
            postgresql_where=sa.text("resolved_at IS NULL"),
        ),
    )

    id = sa.Column(sa.Integer, primary_key=True)
    kind = sa.Column(sa.String(32), nullable=False)
    host_id = sa.Column(sa.Integer, sa.ForeignKey("hosts.id", ondelete="CASCADE"))
    dedup_key = sa.Column(sa.String(128), nullable=False)
    message = sa.Column(sa.Text, nullable=False)
    count = sa.Column(sa.Integer, nullable=False, default=1)
    first_seen = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    last_seen = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    resolved_at = sa.Column(sa.DateTime)
    acknowledged_at = sa.Column(sa.DateTime)
    acknowledged_by = sa.Column(sa.String(128))

    host = db.relationship("Host")

    @classmethod
    def get(cls, alert_id: int) -> Alert:
        """The alert with this id; :class:`Refusal` 404 ``alert_not_found`` if none."""
        alert = db.session.get(cls, alert_id)
        if alert is None:
            raise Refusal(404, "alert_not_found", f"no alert with id {alert_id}")
        return alert

    def acknowledge(self, actor: str) -> bool:
        """Record that ``actor`` has seen this open alert (audited ``alert.acknowledged``); the caller commits.

        Return False, changing nothing, if it was already acknowledged. It stays acknowledged if it
        recurs (its count goes up) and until it is resolved; a later alert of the same kind is a new,
        unacknowledged row. A resolved alert is refused: there is nothing left to acknowledge.
        """
        if self.resolved_at is not None:
            raise Refusal(409, "alert_resolved", f"alert {self.id} is already resolved")
        if self.acknowledged_at is not None:
            return False
        self.acknowledged_at, self.acknowledged_by = utcnow(), actor
        AuditEvent.record(actor, "alert.acknowledged", f"alert:{self.id}", kind=self.kind, message=self.message)
        return True

    @classmethod
    def raise_or_touch(cls, kind: str, dedup_key: str, message: str, host_id: int | None = None) -> Alert:
        """Open an alert, or bump the open one with the same kind and dedup key.

        A newly opened alert is announced (``runtime().alert_raised``, which notifies people)
        after the transaction commits; touching an open one announces nothing.
        """
        now = utcnow()
        for _ in range(3):
            alert = db.session.scalar(
                sa.select(cls).where(cls.kind == kind, cls.dedup_key == dedup_key, cls.resolved_at.is_(None))
            )
            if alert is not None:
                alert.count += 1
                alert.last_seen = now
                alert.message = message
                return alert
            try:
                with db.session.begin_nested():
                    alert = cls(
                        kind=kind, dedup_key=dedup_key, message=message, host_id=host_id, first_seen=now, last_seen=now
                    )
                    db.session.add(alert)
                on_commit(runtime().alert_raised.publish, alert.announcement())
                return alert
            except IntegrityError:
                continue  # another thread opened it first; touch theirs
        raise RuntimeError(f"could not raise alert {kind}/{dedup_key}")

    @classmethod
    def resolve(cls, kind: str, dedup_key: str) -> int:
        """Resolve the open alert of this kind and key, if any; return how many were resolved.

        Every agent hello asks (``watcher.on_hello``) and almost never finds one: look first, so
        that the usual answer is a read, not a write that queues for SQLite's write lock.
        """
        if db.session.scalar(_open_alert(), {"kind": kind, "dedup_key": dedup_key}) is None:
            return 0
        is_open = (cls.kind == kind, cls.dedup_key == dedup_key, cls.resolved_at.is_(None))
        res = db.session.execute(sa.update(cls).where(*is_open).values(resolved_at=utcnow()))
        return res.rowcount or 0

    @classmethod
    def open_keys(cls, kind: str, dedup_keys: list[str]) -> set[str]:
        """Which of these keys have an open alert of this kind (one read)."""
        return set(db.session.scalars(_open_alert_keys(), {"kind": kind, "keys": list(dedup_keys)}))

    @classmethod
    def resolve_many(cls, kind: str, dedup_keys: list[str]) -> int:
        """Resolve the open alerts of this kind for these keys: one UPDATE (for a writer that holds the lock)."""
        res = db.session.execute(
            sa.update(cls)
            .where(cls.kind == kind, cls.dedup_key.in_(dedup_keys), cls.resolved_at.is_(None))
            .values(resolved_at=utcnow())
        )
        return res.rowcount or 0

    @classmethod
    def listing(cls, status: str = "open", limit: int = RESOLVED_ALERTS_LIMIT) -> list[Alert]:
        """Open alerts (all, most recently seen first), resolved ones (newest ``limit``), or ``all``."""
        q = sa.select(cls)
        if status == "open":
            q = q.where(cls.resolved_at.is_(None)).order_by(cls.last_seen.desc())
        elif status == "resolved":
            q = q.where(cls.resolved_at.is_not(None)).order_by(cls.resolved_at.desc()).limit(limit)
        else:
            q = q.order_by(cls.last_seen.desc()).limit(limit * 4)
        return list(db.session.scalars(q))

    def announcement(self) -> dict:
        """What ``alert_raised`` carries: the alert as a plain dict, with its host's name."""
        host = db.session.scalar(sa.select(Host.name).where(Host.id == self.host_id)) if self.host_id else None
        return {**self.to_dict(), "host": host}

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "host_id": self.host_id,
            "dedup_key": self.dedup_key,
            "message": self.message,
            "count": self.count,
            "first_seen": isoformat(self.first_seen),
            "last_seen": isoformat(self.last_seen),
            "resolved_at": isoformat(self.resolved_at),
            "open": self.resolved_at is None,
            "acknowledged_at": isoformat(self.acknowledged_at),
            "acknowledged_by": self.acknowledged_by,
        }


# The two reads every agent connection makes, built once: building such a statement (column
# comparisons, bind coercion) cost SQLAlchemy about three times what executing it did, ~0.3 ms
# of CPU per connection each in a reconnect storm (docs/capacity.md).


@functools.cache
def _host_by_token() -> sa.Select:
    return sa.select(Host.id, Host.name).where(Host.token_hash == sa.bindparam("token_hash"))


@functools.cache
def _open_alert_keys() -> sa.Select:
    """The presence writer's read for each batch of hellos (app/updates/watcher.py), built once too."""
    return sa.select(Alert.dedup_key).where(
        Alert.kind == sa.bindparam("kind"),
        Alert.dedup_key.in_(sa.bindparam("keys", expanding=True)),
        Alert.resolved_at.is_(None),
    )


@functools.cache
def _open_alert() -> sa.Select:
    return (
        sa.select(Alert.id)
        .where(
            Alert.kind == sa.bindparam("kind"),
            Alert.dedup_key == sa.bindparam("dedup_key"),
            Alert.resolved_at.is_(None),
        )
        .limit(1)
    )


class AuditEvent(db.Model):
    """Append-only: the migration installs triggers that refuse UPDATE and DELETE."""

    __tablename__ = "audit_events"

    id = sa.Column(sa.Integer, primary_key=True)
    at = sa.Column(sa.DateTime, nullable=False, default=utcnow, index=True)
    actor = sa.Column(sa.String(128), nullable=False)
    action = sa.Column(sa.String(64), nullable=False, index=True)
    target = sa.Column(sa.String(128), nullable=False, default="")
    details = sa.Column(sa.JSON, nullable=False, default=dict)

    @classmethod
    def record(cls, actor: str, action: str, target: str = "", **details) -> AuditEvent:
        ev = cls(at=utcnow(), actor=actor, action=action, target=target, details=details)
        db.session.add(ev)
        return ev

    @classmethod
    def page(cls, limit: int, before_id: int | None = None) -> tuple[list[AuditEvent], int | None]:
        """Newest first; return the page and the ``before_id`` of the next (older) page, if any."""
        q = sa.select(cls).order_by(cls.id.desc()).limit(limit + 1)
        if before_id is not None:
            q = q.where(cls.id < before_id)
        rows = list(db.session.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].id if more and rows else None)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "at": isoformat(self.at),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "details": self.details,
        }


class AgentRelease(db.Model):
    __tablename__ = "agent_releases"
    __table_args__ = (sa.UniqueConstraint("version", "platform", name="uq_agent_releases_version_platform"),)

    id = sa.Column(sa.Integer, primary_key=True)
    version = sa.Column(sa.String(128), nullable=False)
    platform = sa.Column(sa.String(64), nullable=False)
    sha256 = sa.Column(sa.String(64), nullable=False)
    size = sa.Column(sa.BigInteger, nullable=False)
    signature = sa.Column(sa.Text)
    path = sa.Column(sa.Text, nullable=False)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)


class FleetUpdate(db.Model):
    __tablename__ = "fleet_updates"
    __table_args__ = (
        sa.CheckConstraint(_in("status", FLEET_STATUSES), name="status"),
        sa.Index(
            "uq_fleet_updates_one_running",
            "status",
            unique=True,
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        ),
    )

    id = sa.Column(sa.Integer, primary_key=True)
    target_version = sa.Column(sa.String(128), nullable=False)
    status = sa.Column(sa.String(16), nullable=False, default="running")
    strategy = sa.Column(sa.String(32), nullable=False, default="rolling")
    created_by = sa.Column(sa.String(128), nullable=False)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    finished_at = sa.Column(sa.DateTime)
    halt_reason = sa.Column(sa.Text)
    cancel_requested = sa.Column(sa.Boolean, nullable=False, default=False)
    # What the rollout selected: the request's targeting fields (labels, os, arch, version, ...).
    selector = sa.Column(sa.JSON, nullable=False, default=dict, server_default=sa.text("'{}'"))
    # The strategy (docs/updates.md): counts, or percentages of the selected hosts ("10%").
    canary = sa.Column(sa.Integer, nullable=False, default=0, server_default=sa.text("0"))
    canary_soak_s = sa.Column(sa.Float, nullable=False, default=0.0, server_default=sa.text("0"))
    max_in_flight = sa.Column(sa.String(16), nullable=False, default="1", server_default="1")
    max_failures = sa.Column(sa.String(16), nullable=False, default="0", server_default="0")
    wave_soak_s = sa.Column(sa.Float, nullable=False, default=0.0, server_default=sa.text("0"))
    offline = sa.Column(sa.String(8), nullable=False, default="halt", server_default="halt")
    offline_deadline_s = sa.Column(sa.Float)
    # Control: a paused rollout stays ``running`` (it keeps the one-running slot) but dispatches nothing.
    paused_at = sa.Column(sa.DateTime)
    paused_by = sa.Column(sa.String(128))
    hold_until = sa.Column(sa.DateTime)  # no new wave before this (a canary's or a wave's soak)
    # Schedule: a ``scheduled`` rollout starts at ``start_at`` (UTC; ``start_tz`` as the operator gave it).
    start_at = sa.Column(sa.DateTime)
    start_tz = sa.Column(sa.String(64))
    started_at = sa.Column(sa.DateTime)
    respect_windows = sa.Column(sa.Boolean, nullable=False, default=False, server_default=sa.false())
    revert_on_halt = sa.Column(sa.Boolean, nullable=False, default=False, server_default=sa.false())
    kind = sa.Column(sa.String(16), nullable=False, default="update", server_default="update")
    parent_id = sa.Column(sa.Integer, sa.ForeignKey("fleet_updates.id", ondelete="SET NULL"))

    hosts = db.relationship(
        "FleetUpdateHost", order_by="FleetUpdateHost.position", back_populates="fleet_update", cascade="all"
    )

    @property
    def total(self) -> int:
        return len(self.hosts)

    @property
    def done(self) -> int:
        """Hosts finished without trouble: updated, or skipped as already current."""
        return sum(r.status in ("succeeded", "skipped") for r in self.hosts)

    def to_dict(self) -> dict:
        rows = list(self.hosts)
        return {
            "id": self.id,
            "status": self.status,
            "target_version": self.target_version,
            "strategy": self.strategy,
            "selector": dict(self.selector or {}),
            "created_by": self.created_by,
            "created_at": isoformat(self.created_at),
            "finished_at": isoformat(self.finished_at),
            "halt_reason": self.halt_reason,
            "start_at": isoformat(self.start_at),
            "start_tz": self.start_tz,
            "respect_windows": bool(self.respect_windows),
            "total": self.total,
            "done": self.done,
            "failed": sum(r.status == "failed" for r in rows),
            "kind": self.kind,
            "parent_id": self.parent_id,
            "started_at": isoformat(self.started_at),
            "canary": self.canary,
            "canary_soak_s": self.canary_soak_s,
            "max_in_flight": self.max_in_flight,
            "max_failures": self.max_failures,
            "wave_soak_s": self.wave_soak_s,
            "offline": self.offline,
            "offline_deadline_s": self.offline_deadline_s,
            "paused_at": isoformat(self.paused_at),
            "paused_by": self.paused_by,
            "hold_until": isoformat(self.hold_until),
            "revert_on_halt": self.revert_on_halt,
            "hosts": [r.to_dict() for r in rows],
        }


class FleetUpdateHost(db.Model):
    __tablename__ = "fleet_update_hosts"
    __table_args__ = (
        sa.UniqueConstraint("fleet_update_id", "host_id", name="uq_fleet_update_hosts_fleet_host"),
        sa.CheckConstraint(_in("status", FLEET_HOST_STATUSES), name="status"),
    )

    id = sa.Column(sa.Integer, primary_key=True)
    fleet_update_id = sa.Column(
        sa.Integer, sa.ForeignKey("fleet_updates.id", ondelete="CASCADE"), nullable=False, index=True
    )
    host_id = sa.Column(sa.Integer, sa.ForeignKey("hosts.id", ondelete="SET NULL"))
    host_name = sa.Column(sa.String(128))
    position = sa.Column(sa.Integer, nullable=False)
    status = sa.Column(sa.String(16), nullable=False, default="pending")
    job_id = sa.Column(sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"))
    error = sa.Column(sa.Text)
    started_at = sa.Column(sa.DateTime)
    finished_at = sa.Column(sa.DateTime)
    wave = sa.Column(sa.Integer, nullable=False, default=0, server_default=sa.text("0"))
    from_version = sa.Column(sa.String(128))  # what the host ran when its update was dispatched
    target_version = sa.Column(sa.String(128))  # this host's target, when not the rollout's (a revert)
    waiting_since = sa.Column(sa.DateTime)  # the rollout has been waiting for this offline host since
    window_waiting_since = sa.Column(sa.DateTime)  # held back by respect_windows since (first time)
    window_name = sa.Column(sa.String(100))  # ... waiting for this maintenance window

    fleet_update = db.relationship("FleetUpdate", back_populates="hosts")
    host = db.relationship("Host")
    job = db.relationship("Job")

    @property
    def name(self) -> str | None:
        """The host's name, kept on the row for after the host is deleted."""
        return self.host.name if self.host else self.host_name

    def to_dict(self) -> dict:
        return {
            "host_id": self.host_id,
            "name": self.name,
            "position": self.position,
            "wave": self.wave,
            "status": self.status,
            "job_id": self.job_id,
            "phase": self.job.phase if self.job else None,
            "error": self.error,
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "from_version": self.from_version,
            "target_version": self.target_version,
            "waiting_since": isoformat(self.waiting_since),
            "window_waiting_since": isoformat(self.window_waiting_since),
            "window_name": self.window_name,
            "duration_s": (self.finished_at - self.started_at).total_seconds()
            if self.started_at and self.finished_at
            else None,
        }


class MaintenanceWindow(db.Model):
    """A named weekly window (``days`` 0=Monday..6, ``start``-``end`` "HH:MM" in ``timezone``).

    It applies to the hosts whose labels include all of ``labels`` (``{}``: every host). An ``end``
    before ``start`` runs past midnight into the next day.
    """

    __tablename__ = "maintenance_windows"

    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(100), nullable=False, unique=True)
    days = sa.Column(sa.JSON, nullable=False, default=list)
    start = sa.Column(sa.String(5), nullable=False)
    end = sa.Column(sa.String(5), nullable=False)
    timezone = sa.Column(sa.String(64), nullable=False)
    labels = sa.Column(sa.JSON, nullable=False, default=dict)
    created_by = sa.Column(sa.String(128), nullable=False)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
