"""`privscore certs init`: a dev CA, a server certificate and one client certificate per role.

Identities are SPIFFE-style URI SANs (spiffe://privscore.dev/client/<name>): the server reads
them from the verified certificate, never from anything the caller sets. Production uses the
organisation's CA and short-lived certificates; these files are for one machine.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.files import private_dir, write_private

TRUST_DOMAIN = "privscore.dev"
SERVER_NAME = "localhost"  # the name clients verify; the certificate also covers 127.0.0.1
CLIENT_NAMES = (
    "dev",
    "scorer",
    "limit-manager",
    "monitor",
    "risk-officer",
    "auditor",
    "customer-service",
    "privacy-office",
    "model-admin",
    "collections",
    "probe",
    "nobody",
)
VALID_DAYS = 365


def client_identity(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/client/{name}"


@dataclass(frozen=True)
class CertPaths:
    """Where the dev certificates live under the data directory."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.directory / f"client-{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.directory / f"client-{name}.key"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    """Owner-only like every file under the data directory; callers get copies."""
    write_private(path, cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    sans: list[x509.GeneralName],
    usage: list[x509.ObjectIdentifier],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def init_certs(directory: Path) -> list[str]:
    """Create the dev CA and certificates that are missing; returns what was created."""
    paths = CertPaths(directory)
    private_dir(directory)
    created: list[str] = []
    if not paths.ca.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privscore dev CA")])
        ca_cert = _issue("privscore dev CA", ca_key, ca_name, ca_key, ca=True, sans=[], usage=[])
        _write_key(paths.ca_key, ca_key)
        _write_cert(paths.ca, ca_cert)
        created.append(f"dev CA {paths.ca}")
    ca_cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    ca_key_loaded = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
    assert isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey)

    def issue(
        cert_path: Path,
        key_path: Path,
        subject: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> None:
        if cert_path.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            subject, key, ca_cert.subject, ca_key_loaded, ca=False, sans=sans, usage=[usage]
        )
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        created.append(f"certificate {cert_path}")

    issue(
        paths.server_cert,
        paths.server_key,
        "privscore server",
        [
            x509.DNSName(SERVER_NAME),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/server"),
        ],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    for name in CLIENT_NAMES:
        issue(
            paths.client_cert(name),
            paths.client_key(name),
            f"privscore client {name}",
            [x509.UniformResourceIdentifier(client_identity(name))],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
    return created
