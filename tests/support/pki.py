"""Test certificates, made at test time with ``cryptography``: a CA, the server's certificate
for 127.0.0.1 signed by it, and the two a man in the middle could present instead (one from
another CA, one from the right CA for another name).

The ``pki`` session fixture in tests/conftest.py makes them once per run (:func:`make_pki`), in
PEM files under the run's temporary directory. Like the rest of tests/support this imports no
pytest, so a script can use it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names the server's certificate is valid for (tests connect to 127.0.0.1).
SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class KeyPair:
    cert: str  # PEM certificate path
    key: str  # PEM private key path (unencrypted)


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA certificate an agent pins (server_ca)
    server: KeyPair  # signed by ``ca`` for 127.0.0.1 and localhost
    foreign: KeyPair  # for the same names, signed by another CA
    wrong_name: KeyPair  # signed by ``ca``, for another host name only
    other_ca: str  # the CA that signed ``foreign``


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))


def make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    names: tuple[str, ...], ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for ``names`` (IP addresses or DNS names) signed by the CA."""
    key = _key()
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_cert(path: str, cert: x509.Certificate) -> str:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: str, key: ec.EllipticCurvePrivateKey) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def make_pki(directory: str) -> Pki:
    os.makedirs(directory, exist_ok=True)

    def pair(stem: str, names, ca_cert, ca_key) -> KeyPair:
        cert, key = make_leaf(names, ca_cert, ca_key)
        return KeyPair(
            write_cert(os.path.join(directory, f"{stem}.pem"), cert),
            write_key(os.path.join(directory, f"{stem}.key"), key),
        )

    ca_cert, ca_key = make_ca("restic-manager test CA")
    other_cert, other_key = make_ca("someone else's CA")
    return Pki(
        ca=write_cert(os.path.join(directory, "ca.pem"), ca_cert),
        server=pair("server", SERVER_NAMES, ca_cert, ca_key),
        foreign=pair("foreign", SERVER_NAMES, other_cert, other_key),
        wrong_name=pair("wrong-name", ("agents.example.org",), ca_cert, ca_key),
        other_ca=write_cert(os.path.join(directory, "other-ca.pem"), other_cert),
    )
