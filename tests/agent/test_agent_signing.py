"""Release signatures: the pure-Python ed25519 verifier against RFC 8032 and ``cryptography``,
the signed build, and the stdlib PEP 440 ordering the downgrade check (and the server) uses."""

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.version import Version

from agent import signing
from agent.build import build_agent
from agent.build import main as build_main
from agent.version import compare_versions

b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731

# RFC 8032 section 7.1, tests 1-3: (public key, message, signature)
RFC_VECTORS = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]
L = 2**252 + 27742317777372353535851937790883648493


@pytest.mark.parametrize("pub, msg, sig", RFC_VECTORS)
def test_the_rfc_8032_vectors_verify(pub, msg, sig):
    assert signing.verify(b64(bytes.fromhex(pub)), bytes.fromhex(msg), b64(bytes.fromhex(sig)))
    assert not signing.verify(b64(bytes.fromhex(pub)), bytes.fromhex(msg) + b"\0", b64(bytes.fromhex(sig)))


def test_s_at_or_above_the_group_order_is_refused():
    pub, msg, sig = (bytes.fromhex(x) for x in RFC_VECTORS[0])
    s = int.from_bytes(sig[32:], "little")
    malleable = sig[:32] + (s + L).to_bytes(32, "little")  # the same point equation, S + L
    assert not signing.verify(b64(pub), msg, b64(malleable))


def test_non_canonical_encodings_are_refused():
    pub, msg, sig = (bytes.fromhex(x) for x in RFC_VECTORS[0])
    p = 2**255 - 19
    non_canonical_y = (p + 1).to_bytes(32, "little")  # y >= p: encodes y = 1 non-canonically
    assert not signing.verify(b64(non_canonical_y), msg, b64(sig))
    assert not signing.verify(b64(pub), msg, b64(non_canonical_y + sig[32:]))
    minus_zero = (1 | (1 << 255)).to_bytes(32, "little")  # x = 0 with the sign bit set
    assert not signing.verify(b64(minus_zero), msg, b64(sig))
    assert not signing.public_key_is_valid(b64(minus_zero))


@pytest.mark.parametrize(
    "key, manifest, sig",
    [
        (None, b"m", "x"),
        ("", b"m", ""),
        ("!!!", b"m", "AAAA"),
        (b64(b"\0" * 31), b"m", b64(b"\0" * 64)),
        (b64(b"\0" * 32), b"m", b64(b"\0" * 63)),
        (b64(b"\xff" * 32), b"m", b64(b"\xff" * 64)),
        (12, 13, 14),
        (b64(bytes.fromhex(RFC_VECTORS[0][0])), "not bytes", b64(bytes.fromhex(RFC_VECTORS[0][2]))),
    ],
)
def test_garbage_is_answered_false_never_raised(key, manifest, sig):
    assert signing.verify(key, manifest, sig) is False


KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 6)]


def raw_public(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=300),
    which=st.sampled_from(["signature", "message", "key"]),
    bit=st.integers(min_value=0, max_value=10_000),
)
def test_verify_agrees_with_cryptography_and_any_flipped_bit_fails(seed, message, which, bit):
    key = Ed25519PrivateKey.from_private_bytes(seed)
    pub, sig = raw_public(key), key.sign(message)
    assert signing.verify(b64(pub), message, b64(sig))

    def flip(data):
        data = bytearray(data)
        data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
        return bytes(data)

    if which == "signature":
        assert not signing.verify(b64(pub), message, b64(flip(sig)))
    elif which == "message":
        assert not signing.verify(b64(pub), flip(message) if message else b"\0", b64(sig))
    else:
        assert not signing.verify(b64(flip(pub)), message, b64(sig))


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=100), other=st.integers(min_value=1, max_value=4))
def test_a_signature_by_another_key_fails(message, other):
    assert not signing.verify(b64(raw_public(KEYS[0])), message, b64(KEYS[other].sign(message)))


def test_sign_and_generate_round_trip_through_pem():
    pem, pub = signing.generate_keypair()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert len(base64.b64decode(pub)) == 32 and signing.public_key_from_private(pem) == pub
    manifest = signing.manifest_bytes("2.0.0", "py3-any", 10, "ab" * 32)
    assert signing.verify(pub, manifest, signing.sign(pem, manifest))


def test_the_manifest_is_canonical_json():
    assert signing.manifest_bytes("2.0.0", "py3-any", 10, "ab") == (
        b'{"platform":"py3-any","sha256":"ab","size":10,"version":"2.0.0"}'
    )
    assert json.loads(signing.manifest_bytes("1", "p", 1, "x")) == {
        "platform": "p",
        "sha256": "x",
        "size": 1,
        "version": "1",
    }


def test_the_base_point_table_is_built_once_and_reused():
    """What keeps a check cheap: [2^i]B is built on the first check only (speed: scripts/bench/signing.py)."""
    pem, pub = signing.generate_keypair()
    manifest = signing.manifest_bytes("2.0.0", "py3-any", 123456, "cd" * 32)
    sig = signing.sign(pem, manifest)
    assert signing.verify(pub, manifest, sig)
    table = list(signing._BASE_TABLE)
    assert len(table) == 253
    for _ in range(3):
        assert signing.verify(pub, manifest, sig)
    assert signing._BASE_TABLE == table and all(a is b for a, b in zip(signing._BASE_TABLE, table, strict=True))


def test_a_signed_build_writes_the_signature_file(tmp_path, release_key):
    pem, pub = release_key
    result = build_agent("3.1.4", str(tmp_path), sign_key=pem)
    sig_file = tmp_path / "restic-manager-agent-3.1.4.pyz.sig"
    assert sig_file.read_text() == result.signature + "\n"
    manifest = signing.manifest_bytes("3.1.4", "py3-any", result.size, result.sha256)
    assert signing.verify(pub, manifest, result.signature)
    # rebuilt unsigned: a signature of other bytes must not linger beside the artifact
    assert build_agent("3.1.4", str(tmp_path)).signature is None and not sig_file.exists()


def test_the_build_cli_signs_with_a_key_file(tmp_path, release_key, capsys):
    key_file = tmp_path / "release.pem"
    key_file.write_bytes(release_key[0])
    assert build_main(["--version", "3.2", "--out", str(tmp_path / "out"), "--sign-key", str(key_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signature"] and os.path.exists(out["path"] + ".sig")
    assert build_main(["--version", "3.2", "--out", str(tmp_path / "o"), "--sign-key", str(tmp_path / "nope")]) == 1


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("1.0", "1.0.0", 0),
        ("2.0rc1", "2.0", -1),
        ("1.0.dev1", "1.0a1", -1),
        ("1.0.post1", "1.0", 1),
        ("1.0+local", "1.0", 1),
        ("1!0.1", "2.0", 1),
        ("1.10", "1.9", 1),
        ("0.1.dev3+g1234", "0.1.dev3", 1),
        ("garbage", "1.0", 1),  # string order when either does not parse
        ("abc", "abd", -1),
    ],
)
def test_compare_versions(a, b, expected):
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_compare_versions_never_raises():
    for a, b in [(None, "1"), (1, 2), ("1", object()), ("", "")]:
        assert compare_versions(a, b) in (-1, 0, 1)


pep440 = st.builds(
    lambda epoch, rel, pre, post, dev, local: (
        (f"{epoch}!" if epoch else "")
        + ".".join(map(str, rel))
        + (f"{pre[0]}{pre[1]}" if pre else "")
        + (f".post{post}" if post is not None else "")
        + (f".dev{dev}" if dev is not None else "")
        + (f"+{local}" if local else "")
    ),
    st.integers(0, 2),
    st.lists(st.integers(0, 12), min_size=1, max_size=4),
    st.none() | st.tuples(st.sampled_from(["a", "b", "rc", "alpha", "c"]), st.integers(0, 3)),
    st.none() | st.integers(0, 3),
    st.none() | st.integers(0, 3),
    st.none() | st.sampled_from(["abc", "1", "abc.2", "7.x", "g123"]),
)


@settings(max_examples=400, deadline=None)
@given(a=pep440, b=pep440)
def test_compare_versions_agrees_with_packaging(a, b):
    va, vb = Version(a), Version(b)
    assert compare_versions(a, b) == (va > vb) - (va < vb)
