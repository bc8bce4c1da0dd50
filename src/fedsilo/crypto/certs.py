"""Deployment key material: the federation's TLS CA and certificates, and SuperNode node keys.

Two kinds of material, kept apart from the Ed25519 identity keys in :mod:`fedsilo.crypto.keys`:

- TLS: a private certificate authority created by the coordinator (``ca.pem``/``ca.key``), and
  the coordinator's server certificate signed by it (``coordinator.pem``/``coordinator.key``)
  with the subject alternative names (DNS names, IP addresses) sites connect to. Sites trust
  only ``ca.pem``. Keys are ECDSA P-256, which uvicorn, nginx and httpx all accept.
- Flower SuperNode authentication: an ECDSA P-384 key pair per site, in OpenSSH format as
  ``flower-supernode --auth-supernode-private-key`` reads it; the coordinator registers the
  public half with its SuperLink, which then admits only SuperNodes that sign with it.

Private key files are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.crypto.keys import KeyFileError
from fedsilo.storage import read_regular_file, write_bytes_atomic

_PRIVATE_MODE = 0o600
NODE_KEY_TYPE = "ecdsa-sha2-nistp384"
DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CoordinatorTls:
    """Where ``fedsilo certs init`` put the coordinator's TLS material."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    if os.path.lexists(path):
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a private key")
    write_bytes_atomic(path, data, mode=_PRIVATE_MODE)


def _ec_private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def parse_san(text: str) -> x509.GeneralName:
    """A subject alternative name: an IP address if ``text`` parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not text or any(c.isspace() for c in text) or "/" in text:
        raise ValueError(f"subject alternative name {text!r} is neither an IP nor a DNS name")
    return x509.DNSName(text)


def create_ca(
    *, common_name: str, valid_days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh self-signed CA key and certificate that can sign server certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    sans: tuple[str, ...],
    valid_days: int,
    not_before: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for ``sans``, signed by the CA.

    ``not_before`` (default: now) shifts the validity window; tests use it to make a
    certificate that has already expired.
    """
    if not sans:
        raise ValueError("a server certificate needs at least one subject alternative name")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([parse_san(s) for s in sans]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """``SHA256:`` and the colon-separated hex sha256 of the DER certificate (as openssl shows)."""
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def read_certificate(path: Path) -> x509.Certificate:
    """Load one PEM certificate; errors name the file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: certificate file not found") from None
    except ValueError as error:
        raise KeyFileError(f"{path}: not a PEM certificate: {error}") from None


MAX_CERTIFICATE_FILE_BYTES = 1024 * 1024


def read_ca_certificate(path: Path) -> tuple[x509.Certificate, bytes]:
    """The federation CA certificate in ``path`` and the file's bytes, read once.

    A site trusts every certificate in the file it hands to TLS, while the fingerprint an
    operator compares is the first one's: so the file must hold exactly one certificate, and
    that one a CA. Errors name the file.
    """
    try:
        data = read_regular_file(Path(path), limit=MAX_CERTIFICATE_FILE_BYTES)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: certificate file not found") from None
    except OSError as error:
        raise KeyFileError(f"{path}: cannot be read: {error.strerror}") from None
    except ValueError as error:
        raise KeyFileError(str(error)) from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise KeyFileError(f"{path}: not a PEM certificate: {error}") from None
    if len(certificates) != 1:
        raise KeyFileError(
            f"{path}: holds {len(certificates)} certificates; the federation CA file must hold "
            "exactly one (TLS would trust every one of them)"
        )
    [certificate] = certificates
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyFileError(f"{path}: the certificate is not a CA certificate")
    return certificate, data


def read_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a PEM EC private key (the CA's), refusing files others may read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: private key file not found") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: permissions {mode:04o} are too open (chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: holds a {type(key).__name__}, not an EC private key")
    return key


def init_coordinator_tls(
    out_dir: Path,
    *,
    sans: tuple[str, ...],
    valid_days: int = 365,
    federation: str = "fedsilo",
) -> CoordinatorTls:
    """Create the CA and the coordinator's server certificate in ``out_dir``.

    Refuses to replace existing files: a new CA would orphan every site that trusts the old one.
    """
    out_dir = Path(out_dir)
    paths = CoordinatorTls(
        ca_cert=out_dir / "ca.pem",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "coordinator.pem",
        server_key=out_dir / "coordinator.key",
    )
    for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
        if os.path.lexists(path):
            raise KeyFileError(f"{path}: already exists; refusing to replace the federation's CA")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca(common_name=f"{federation} CA", valid_days=valid_days)
    server_key, server_cert = issue_server_cert(
        ca_key, ca_cert, common_name=f"{federation} coordinator", sans=sans, valid_days=valid_days
    )
    _write_private(paths.ca_key, _ec_private_pem(ca_key))
    write_bytes_atomic(paths.ca_cert, certificate_pem(ca_cert))
    _write_private(paths.server_key, _ec_private_pem(server_key))
    # The chain a server presents: its own certificate, then the CA's.
    write_bytes_atomic(paths.server_cert, certificate_pem(server_cert) + certificate_pem(ca_cert))
    return paths


def write_server_cert(
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    cert_path: Path,
    key_path: Path,
) -> None:
    """Write a server key (0600) and its chain (certificate, then CA)."""
    _write_private(Path(key_path), _ec_private_pem(key))
    write_bytes_atomic(Path(cert_path), certificate_pem(cert) + certificate_pem(ca_cert))


# --- SuperNode authentication keys -------------------------------------------------------


def init_node_keys(name: str, out_dir: Path) -> tuple[Path, Path]:
    """Create ``out_dir/NAME.node.key`` (OpenSSH, 0600) and ``NAME.node.pub`` (one line)."""
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / f"{name}.node.key", out_dir / f"{name}.node.pub"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise KeyFileError(f"{path}: already exists; refusing to replace a node key")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write_private(private_path, private)
    write_bytes_atomic(public_path, (node_public_key_text(key.public_key()) + "\n").encode())
    return private_path, public_path


def node_public_key_text(key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH one-line form, ``ecdsa-sha2-nistp384 AAAA...``."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def parse_node_public_key(text: str, *, source: str) -> ec.EllipticCurvePublicKey:
    """Parse an OpenSSH ECDSA P-384 public key line; errors name ``source``."""
    parts = text.strip().split()
    if len(parts) < 2 or parts[0] != NODE_KEY_TYPE:
        raise KeyFileError(f"{source}: not an OpenSSH {NODE_KEY_TYPE} public key")
    try:
        key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeError) as error:
        raise KeyFileError(f"{source}: cannot parse the node public key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise KeyFileError(f"{source}: the node key must be ECDSA on P-384")
    return key


def read_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a node key written by :func:`init_node_keys` (the SuperNode reads the same file)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: node key file not found") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: permissions {mode:04o} are too open (chmod 600 {path})")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise KeyFileError(f"{path}: not an OpenSSH node private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: not an ECDSA node private key")
    return key


def node_public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The PEM SubjectPublicKeyInfo bytes that Flower's SuperLink stores for a node."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def node_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """The fingerprint ``ssh-keygen -lf NAME.node.pub`` shows: sha256 of the key's SSH blob."""
    blob_b64 = node_public_key_text(key).split()[1]
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except binascii.Error as error:  # pragma: no cover - our own encoding
        raise KeyFileError(f"node public key: {error}") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
