"""Release signing: an ed25519 signature over a small manifest binding version, platform, size, sha256.

The agent only ever *verifies*, with the pure-Python implementation below (RFC 8032, section
5.1.7), so it stays stdlib-only. Signing and key generation happen on the build side, offline,
with the ``cryptography`` package, imported inside those functions only.

The signed bytes are :func:`manifest_bytes`: canonical JSON (sorted keys, no spaces), so the
builder and the agent agree byte for byte. A signature travels as base64 of its 64 raw bytes,
in ``command.update`` and in a ``<artifact>.sig`` file beside the artifact (base64 + "\\n").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

__all__ = [
    "manifest_bytes",
    "verify",
    "sign",
    "generate_keypair",
    "public_key_from_private",
    "public_key_is_valid",
    "SIG_SUFFIX",
]

#: The signature file of ``X.pyz`` is ``X.pyz.sig``.
SIG_SUFFIX = ".sig"


def manifest_bytes(version: str, platform: str, size: int, sha256: str) -> bytes:
    """Return the exact bytes a release signature covers."""
    manifest = {"platform": platform, "sha256": sha256, "size": size, "version": version}
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- ed25519 (RFC 8032)
# Edwards25519: -x^2 + y^2 = 1 + d x^2 y^2 over GF(p), p = 2^255 - 19. Points are kept in
# extended homogeneous coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.
# Verification handles public data only, so variable-time arithmetic is fine here.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)  # a square root of -1
_IDENTITY = (0, 1, 1, 0)


def _add(p1: tuple, p2: tuple) -> tuple:
    # RFC 8032 5.1.4 (add-2008-hwcd-3, a = -1); complete, so it also doubles
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = b - a, dd - c, dd + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _double(p1: tuple) -> tuple:
    # dbl-2008-hwcd, a = -1
    x1, y1, z1, _ = p1
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % _P
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _recover_x(y: int, sign: int) -> int | None:
    # RFC 8032 5.1.3 step 2-4
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx == u:
        pass
    elif vxx == (-u) % _P:
        x = x * _SQRT_M1 % _P
    else:
        return None
    if x == 0 and sign:
        return None  # -0 is not a canonical encoding
    if x & 1 != sign:
        x = _P - x
    return x


def _decode_point(data: bytes) -> tuple | None:
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def _encode_point(point: tuple) -> bytes:
    x, y, z, _ = point
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


_BASE = (
    15112221349535400772501151409588531511454012693041857206046113283949847762202,
    46316835694926478169428394003475163141307993866256225615783033603165251855960,
    1,
    15112221349535400772501151409588531511454012693041857206046113283949847762202
    * 46316835694926478169428394003475163141307993866256225615783033603165251855960
    % _P,
)
_BASE_TABLE: list[tuple] = []  # [2^i]B for i in 0..252, built on first use


def _base_mul(s: int) -> tuple:
    """[s]B from a table of doublings of B: additions only."""
    if not _BASE_TABLE:
        point = _BASE
        for _ in range(253):
            _BASE_TABLE.append(point)
            point = _double(point)
    result = _IDENTITY
    i = 0
    while s:
        if s & 1:
            result = _add(result, _BASE_TABLE[i])
        s >>= 1
        i += 1
    return result


def _mul(s: int, point: tuple) -> tuple:
    """[s]point with a 4-bit fixed window."""
    table = [_IDENTITY, point]
    for _ in range(14):
        table.append(_add(table[-1], point))
    result = _IDENTITY
    for shift in range((s.bit_length() + 3) // 4 * 4 - 4, -4, -4):
        result = _double(_double(_double(_double(result))))
        digit = (s >> shift) & 15
        if digit:
            result = _add(result, table[digit])
    return result


def _neg(point: tuple) -> tuple:
    x, y, z, t = point
    return ((-x) % _P, y, z, (-t) % _P)


def _b64decode(value, length: int) -> bytes | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


def public_key_is_valid(public_key_b64) -> bool:
    """Return True when ``public_key_b64`` is base64 of a canonical 32-byte ed25519 point."""
    raw = _b64decode(public_key_b64, 32)
    return raw is not None and _decode_point(raw) is not None


def verify(public_key_b64: str, manifest: bytes, signature_b64: str) -> bool:
    """Return True only for a valid ed25519 signature of ``manifest``; never raises.

    RFC 8032 5.1.7, cofactorless: S < L, A and R canonical, and [S]B = R + [k]A, checked as
    ``encode([S]B - [k]A) == R`` (which also refuses a non-canonical R, as OpenSSL does).
    """
    try:
        if not isinstance(manifest, (bytes, bytearray)):
            return False
        key = _b64decode(public_key_b64, 32)
        sig = _b64decode(signature_b64, 64)
        if key is None or sig is None:
            return False
        a_point = _decode_point(key)
        if a_point is None:
            return False
        r_bytes, s = sig[:32], int.from_bytes(sig[32:], "little")
        if s >= _L:
            return False
        if _decode_point(r_bytes) is None:
            return False
        k = int.from_bytes(hashlib.sha512(r_bytes + key + bytes(manifest)).digest(), "little") % _L
        check = _add(_base_mul(s), _neg(_mul(k, a_point)))
        return _encode_point(check) == r_bytes
    except Exception:  # a verifier must answer, not crash, whatever it is handed
        return False


# --------------------------------------------------------------------------- build side only


def _load_private(private_key_pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the release signing key must be an ed25519 private key")
    return key


def sign(private_key_pem: bytes, manifest: bytes) -> str:
    """Sign ``manifest`` with a PEM (PKCS8) ed25519 private key; return the base64 signature."""
    return base64.b64encode(_load_private(private_key_pem).sign(manifest)).decode("ascii")


def public_key_from_private(private_key_pem: bytes) -> str:
    """Return base64 of the raw 32-byte public key belonging to ``private_key_pem``."""
    from cryptography.hazmat.primitives import serialization

    raw = (
        _load_private(private_key_pem)
        .public_key()
        .public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    )
    return base64.b64encode(raw).decode("ascii")


def generate_keypair() -> tuple[bytes, str]:
    """Return a new (PKCS8 PEM private key, base64 raw public key) pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    return pem, public_key_from_private(pem)
