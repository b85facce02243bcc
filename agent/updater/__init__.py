"""Agent self-update: download, verify, stage beside the program, swap, and hand over to a restart.

The flow never overwrites running code in place. The new program is downloaded to
``<program>.new`` in the program's own directory (so every rename stays on one filesystem),
checked against the size and sha256 the server announced, flushed to disk, and only then swapped
in: on POSIX by one ``os.replace`` (see :mod:`agent.updater.posix`), on Windows by a detached
helper script that waits for this process to exit (see :mod:`agent.updater.windows`). The previous
program is kept as ``<program>.old``. Any failure before the swap raises :class:`UpdateError` with
a reason meant for the operator, removes the partial ``.new`` and leaves the running program alone.

Before anything is downloaded, the command's manifest (version, platform, size, sha256) must carry
a valid ed25519 signature by the release key pinned in the config (:mod:`agent.signing`); the
downloaded file must then match that signed size and sha256. Just before the final rename a
probation marker is written, so the new program can commit or roll back (:mod:`agent.recovery`); the
state and marker files are written through :mod:`agent.statefile`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from agent import platform_tag, signing
from agent.failpoints import failpoint
from agent.statefile import (
    OUTCOME_STARTED,
    SAFE_VERSION_RE,
    new_marker,
    now_iso,
    remove_marker,
    state_path,
    write_marker,
    write_state,
)
from agent.tls import client_context, describe_trust
from agent.version import compare_versions

log = logging.getLogger("agent.updater")

CHUNK = 16 * 1024
PROGRESS_BYTES = 64 * 1024
PROGRESS_SECONDS = 0.2
#: Room kept free beyond the new program and the .old copy, so the update never fills the disk.
SPACE_MARGIN = 1024 * 1024
MAX_ARTIFACT_BYTES = 512 * 1024 * 1024

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[str, int, int], None]


class UpdateError(Exception):
    """An update failed before the swap; the message is the reason reported to the server."""


@dataclass(frozen=True)
class UpdateCommand:
    job_id: str
    version: str
    url: str
    sha256: str
    size: int
    signature: str | None = None
    platform: str | None = None
    allow_downgrade: bool = False

    @classmethod
    def from_data(cls, data: dict) -> UpdateCommand:
        """Build a command from a validated ``command.update`` envelope's data."""
        return cls(
            job_id=data["job_id"],
            version=data["version"],
            url=data["url"],
            sha256=data["sha256"].lower(),
            size=data["size"],
            signature=data.get("signature"),
            platform=data.get("platform"),
            allow_downgrade=data.get("allow_downgrade") is True,
        )

    @property
    def manifest(self) -> bytes:
        """The bytes the release signature covers (the platform defaults to ``py3-any``)."""
        return signing.manifest_bytes(self.version, self.platform or platform_tag(), self.size, self.sha256)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    read_s: float = 30.0
    deadline_s: float = 120.0  # the whole download, so a trickling server cannot hold us forever


def can_self_update(program: str | None) -> bool:
    """Return True when ``program`` is a file whose directory this process may write to."""
    if not program or not os.path.isfile(program):
        return False
    return os.access(os.path.dirname(program), os.W_OK)


def resolve_url(server_url: str, url: str) -> str:
    """Resolve a download URL: a path is taken relative to the server (ws→http, wss→https)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return url
    if parts.scheme:
        raise UpdateError(f"unsupported download URL scheme {parts.scheme!r} in {url!r}")
    base = urlsplit(server_url)
    scheme = {"ws": "http", "wss": "https"}.get(base.scheme, base.scheme)
    return urljoin(f"{scheme}://{base.netloc}/", url)


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- the updater


class Updater:
    """Carry out one ``command.update`` against the program file this agent runs from."""

    def __init__(
        self,
        program: str,
        state_dir: str,
        server_url: str,
        token: str,
        current_version: str,
        *,
        timeouts: Timeouts = Timeouts(),
        disk_usage: Callable = shutil.disk_usage,
        clock: Callable[[], float] = time.monotonic,
        os_name: str = os.name,
        spawn: Callable | None = None,
        pid: int | None = None,
        release_public_key: str | None = None,
        allow_unsigned: bool = False,
        server_ca: str | None = None,
    ):
        self.program = os.path.abspath(program)
        self.state_dir = state_dir
        self.server_url = server_url
        self.token = token
        self.current_version = current_version
        self.timeouts = timeouts
        self.disk_usage = disk_usage
        self.clock = clock
        self.os_name = os_name
        self.spawn = spawn
        self.pid = pid if pid is not None else os.getpid()
        self.release_public_key = release_public_key
        self.allow_unsigned = allow_unsigned
        self.server_ca = server_ca  # https downloads verify against it (else the system store)
        self._cancelled: Callable[[], bool] = lambda: False

    @property
    def staged(self) -> str:
        return self.program + ".new"

    def run(self, cmd: UpdateCommand, progress: Progress, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Update to ``cmd``; return when the process should exit for the restart.

        :param cancelled: polled while downloading; True abandons the update (the agent is stopping).
        :raise UpdateError: on any failure before the swap; the program is untouched.
        """
        self._cancelled = cancelled
        self._check(cmd)  # refusals leave no trace but the update.result
        started = {
            "job_id": cmd.job_id,
            "version": cmd.version,
            "from_version": self.current_version,
            "outcome": OUTCOME_STARTED,
            "error": None,
            "reported": False,
            "at": now_iso(),
        }
        try:
            # if the agent dies from here on, start-up repair turns "started" into "failed"
            write_state(self.state_dir, started)
            self._download(cmd, progress)
            progress("verifying", cmd.size, cmd.size)
            self._verify(cmd)
            failpoint("after_download", self.state_dir)
            progress("staging", cmd.size, cmd.size)
            self._swap(cmd)
        except (UpdateError, OSError) as exc:
            _remove(self.staged)
            error = str(exc) if isinstance(exc, UpdateError) else f"update failed: {exc}"
            try:
                write_state(self.state_dir, {**started, "outcome": "failed", "error": error, "at": now_iso()})
            except OSError as state_exc:
                log.warning("cannot record the failed update: %s", state_exc)
            if isinstance(exc, UpdateError):
                raise
            raise UpdateError(error) from exc
        progress("restarting", cmd.size, cmd.size)

    def _check(self, cmd: UpdateCommand) -> None:
        if not can_self_update(self.program):
            raise UpdateError(f"cannot self-update: {os.path.dirname(self.program)} is not writable")
        if not SAFE_VERSION_RE.match(cmd.version):
            raise UpdateError(f"invalid version {cmd.version!r}: use letters, digits and . + _ -")
        if (cmd.platform or platform_tag()) != platform_tag():
            raise UpdateError(f"artifact platform {cmd.platform!r} does not match this agent's {platform_tag()!r}")
        self._check_signature(cmd)
        if compare_versions(cmd.version, self.current_version) < 0 and not cmd.allow_downgrade:
            raise UpdateError(
                f"refusing a downgrade: version {cmd.version} is older than the running {self.current_version} "
                "(the operator must ask for a downgrade explicitly)"
            )
        if not _SHA256_RE.match(cmd.sha256):
            raise UpdateError(f"invalid sha256 {cmd.sha256!r}: expected 64 hex digits")
        if not 0 < cmd.size <= MAX_ARTIFACT_BYTES:
            raise UpdateError(f"invalid artifact size {cmd.size}")
        directory = os.path.dirname(self.program)
        # the staged file and the .old copy of the current program both need room at once
        need = cmd.size + os.path.getsize(self.program) + SPACE_MARGIN
        free = self.disk_usage(directory).free
        if free < need:
            raise UpdateError(f"not enough free space in {directory}: need {need} bytes, {free} available")

    def _check_signature(self, cmd: UpdateCommand) -> None:
        """Verify the signed manifest before a single byte is downloaded."""
        if self.release_public_key:
            if not cmd.signature:
                raise UpdateError(
                    "unsigned release refused: this agent pins a release key and the update has no signature"
                )
            if not signing.verify(self.release_public_key, cmd.manifest, cmd.signature):
                raise UpdateError(
                    f"bad release signature: the signature does not match version {cmd.version} "
                    f"({cmd.platform or platform_tag()}, {cmd.size} bytes, sha256 {cmd.sha256}) "
                    "under the pinned release key"
                )
        elif not self.allow_unsigned:
            raise UpdateError("unsigned release refused: no release key is pinned and allow_unsigned_updates is off")
        else:
            log.warning(
                "accepting an UNVERIFIED release %s: no release key is pinned (allow_unsigned_updates)", cmd.version
            )

    def _download(self, cmd: UpdateCommand, progress: Progress) -> None:
        url = resolve_url(self.server_url, cmd.url)
        parts = urlsplit(url)
        start = self.clock()
        # http.client rather than urllib.request.urlopen: connect and read timeouts can differ,
        # and redirects are never followed (they would carry the agent token to another host).
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=self.timeouts.connect_s, context=client_context(self.server_ca)
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeouts.connect_s)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        log.info("downloading version %s from %s", cmd.version, url)
        try:
            try:
                conn.connect()
                conn.sock.settimeout(self.timeouts.read_s)
                headers = {"Authorization": f"Bearer {self.token}", "Accept-Encoding": "identity"}
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except TimeoutError:
                raise UpdateError(f"download failed: no answer from {parts.netloc} within the timeout") from None
            except ssl.SSLCertVerificationError as exc:
                raise UpdateError(
                    f"download failed: the server's certificate is not trusted ({exc.verify_message or exc}); "
                    f"this agent trusts {describe_trust(self.server_ca)}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise UpdateError(f"download failed: cannot reach {parts.netloc}: {exc}") from None
            if resp.status != 200:
                hint = " (agent token refused)" if resp.status in (401, 403) else ""
                raise UpdateError(f"download failed: HTTP {resp.status} {resp.reason}{hint}")
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) != cmd.size:
                raise UpdateError(
                    f"download size mismatch: server sent Content-Length {int(length)}, expected {cmd.size}"
                )
            self._stream(resp, cmd, progress, start)
        finally:
            conn.close()

    def _stream(self, resp: http.client.HTTPResponse, cmd: UpdateCommand, progress: Progress, start: float) -> None:
        mode = os.stat(self.program).st_mode & 0o777
        _remove(self.staged)
        fd = os.open(self.staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), mode)
        done = 0
        last_bytes, last_t = 0, self.clock()
        progress("downloading", 0, cmd.size)
        with os.fdopen(fd, "wb") as out:
            while True:
                if self._cancelled():
                    raise UpdateError("update cancelled: the agent is stopping")
                if self.clock() - start > self.timeouts.deadline_s:
                    raise UpdateError(
                        f"download timed out: {done} of {cmd.size} bytes after {self.timeouts.deadline_s:g} s"
                    )
                try:
                    # ask for one byte more than we expect so an oversized body is noticed
                    chunk = resp.read(min(CHUNK, cmd.size - done + 1))
                except http.client.IncompleteRead as exc:
                    done += len(exc.partial)
                    raise UpdateError(f"download truncated: got {done} of {cmd.size} bytes") from None
                except TimeoutError:
                    raise UpdateError(
                        f"download stalled: no data for {self.timeouts.read_s:g} s after {done} of {cmd.size} bytes"
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise UpdateError(f"download interrupted after {done} of {cmd.size} bytes: {exc}") from None
                if not chunk:
                    break
                if done + len(chunk) > cmd.size:
                    raise UpdateError(f"download too large: more than the expected {cmd.size} bytes")
                out.write(chunk)
                done += len(chunk)
                now = self.clock()
                if done - last_bytes >= PROGRESS_BYTES or now - last_t >= PROGRESS_SECONDS:
                    progress("downloading", done, cmd.size)
                    last_bytes, last_t = done, now
            if done != cmd.size:
                raise UpdateError(f"download truncated: got {done} of {cmd.size} bytes")
            out.flush()
            os.fsync(out.fileno())
        if last_bytes != done:
            progress("downloading", done, cmd.size)

    def _verify(self, cmd: UpdateCommand) -> None:
        # hash what is on disk, i.e. exactly the bytes the service manager will run
        size = os.path.getsize(self.staged)
        if size != cmd.size:
            raise UpdateError(f"size mismatch: expected {cmd.size} bytes, got {size}")
        digest = sha256_file(self.staged)
        if digest != cmd.sha256:
            raise UpdateError(f"sha256 mismatch: expected {cmd.sha256} got {digest}")

    def _swap(self, cmd: UpdateCommand) -> None:
        state = {
            "job_id": cmd.job_id,
            "version": cmd.version,
            "from_version": self.current_version,
            "outcome": "swapped",
            "error": None,
            "reported": False,
            "at": now_iso(),
        }
        # Import before the swap: once the archive is replaced, zipimport would read the new file
        # with the old file's offsets, so nothing may be imported from the program after it.
        if self.os_name == "nt":
            from agent.updater import windows

            # the helper swaps after we exit; record the state first so the restarted agent reports it
            write_state(self.state_dir, state)
            try:
                windows.start_helper(self.program, self.pid, spawn=self.spawn)
            except UpdateError:
                _remove(state_path(self.state_dir))
                raise
        else:
            from agent.updater import posix

            posix.keep_old(self.program)
            failpoint("after_old", self.state_dir)
            # the marker exists before the new program can: whatever starts next knows it is on probation
            marker = new_marker(cmd.job_id, self.current_version, cmd.version, cmd.sha256)
            try:
                write_marker(self.state_dir, marker)
            except OSError as exc:
                raise UpdateError(f"cannot write the probation marker: {exc}") from exc
            failpoint("between_renames", self.state_dir)
            try:
                posix.replace(self.program, self.staged)
            except UpdateError:
                remove_marker(self.state_dir)
                raise
            failpoint("after_swap", self.state_dir)
            # past the swap there is no going back: a failure to record the state must not stop the
            # restart (the marker tells the new program what happened)
            try:
                write_state(self.state_dir, state)
            except OSError as exc:
                log.error("swapped, but cannot write %s: %s", state_path(self.state_dir), exc)
        log.info("swapped in version %s (was %s); restarting into it", cmd.version, self.current_version)
