"""Site identity keys: Ed25519 key pairs, their files, their text form and fingerprints.

A site (or the coordinator) is identified by an Ed25519 key pair. The private key lives in a
PEM PKCS#8 file readable only by its owner, optionally encrypted with a passphrase; the public
key travels as one line of text, ``ed25519:<base64 of the 32 raw bytes>``, and is compared by
eye through its OpenSSH-style fingerprint, ``SHA256:<unpadded base64 of sha256(raw bytes)>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsilo.storage import write_bytes_atomic, write_text_atomic

PrivateKey: TypeAlias = Ed25519PrivateKey
PublicKey: TypeAlias = Ed25519PublicKey

PUBLIC_KEY_PREFIX = "ed25519:"
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_ENCRYPTED_PEM_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class KeyFileError(ValueError):
    """A key file or key text that cannot be used; the message names the file and the problem."""


def generate_private_key() -> PrivateKey:
    """A fresh Ed25519 private key from the operating system's secure random source."""
    return Ed25519PrivateKey.generate()


def private_key_from_seed(seed: bytes) -> PrivateKey:
    """The Ed25519 private key for a 32-byte seed (the RFC 8032 "secret key").

    Meant for tests and known-answer vectors; real identities come from
    :func:`generate_private_key`.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def write_private_key(key: PrivateKey, path: Path, *, passphrase: bytes | None) -> None:
    """Write ``key`` to a new PEM PKCS#8 file at ``path`` with mode 0600.

    With a ``passphrase`` the file is encrypted (cryptography's ``BestAvailableEncryption``:
    PBES2 with PBKDF2 and AES-256-CBC; its key derivation is cheap, so the passphrase itself
    must be strong); ``passphrase=None`` writes it unencrypted, relying on the file mode
    alone. An existing file is never replaced: losing a private key loses the identity.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a private key")
    encryption: serialization.KeySerializationEncryption
    if passphrase is None:
        encryption = serialization.NoEncryption()
    elif len(passphrase) == 0:
        raise KeyFileError(f"{path}: empty passphrase; pass passphrase=None for no encryption")
    else:
        encryption = serialization.BestAvailableEncryption(passphrase)
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=encryption,
    )
    write_bytes_atomic(path, pem, mode=_PRIVATE_MODE)
    # Some filesystems ignore chmod; a key they expose must not pass silently.
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != _PRIVATE_MODE:
        raise KeyFileError(f"{path}: written with mode {mode:04o} instead of 0600")


def read_private_key(path: Path, *, passphrase: bytes | None) -> PrivateKey:
    """Load the Ed25519 private key in the PEM PKCS#8 file at ``path``.

    Like ssh, a file that its group or others may access is refused. ``passphrase`` must be
    given exactly when the file is encrypted. Every failure is a :class:`KeyFileError`.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: private key file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read private key file: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: permissions {mode:04o} are too open; a private key must be accessible "
            f"only by its owner (chmod 600 {path})"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read private key file: {exc.strerror}") from None
    return _load_private_pem(data, path, passphrase)


def _load_private_pem(data: bytes, path: Path, passphrase: bytes | None) -> PrivateKey:
    encrypted = _ENCRYPTED_PEM_HEADER in data
    if encrypted and passphrase is None:
        raise KeyFileError(f"{path}: the private key is encrypted and no passphrase was given")
    if not encrypted and passphrase is not None:
        # Refused rather than ignored: whoever expected an encrypted key should learn it is not.
        raise KeyFileError(f"{path}: a passphrase was given but the private key is not encrypted")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except ValueError:
        if encrypted:
            raise KeyFileError(f"{path}: wrong passphrase (or a damaged key file)") from None
        raise KeyFileError(f"{path}: not a PEM private key") from None
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: cannot load private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_text(key: PublicKey) -> str:
    """``"ed25519:"`` followed by the standard, padded base64 of the 32 raw public-key bytes."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(key.public_bytes_raw()).decode("ascii")


def parse_public_key(text: str, *, source: str = "public key") -> PublicKey:
    """Inverse of :func:`public_key_text`; ``source`` names the text's origin in errors.

    Only the canonical encoding is accepted, so each key has exactly one text form.
    """
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise KeyFileError(f"{source}: does not start with {PUBLIC_KEY_PREFIX!r}")
    encoded = text[len(PUBLIC_KEY_PREFIX) :]
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source}: the key is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != encoded:
        raise KeyFileError(f"{source}: the key is not canonical padded base64")
    if len(raw) != PUBLIC_KEY_BYTES:
        raise KeyFileError(
            f"{source}: an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}"
        )
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(f"{source}: not a valid Ed25519 public key: {exc}") from None


def fingerprint(key: PublicKey) -> str:
    """OpenSSH-style fingerprint: ``"SHA256:"`` + unpadded base64 of sha256(raw public bytes).

    Only the style is OpenSSH's: ``ssh-keygen -l`` hashes its own key encoding, so it shows a
    different value for the same key.
    """
    digest = hashlib.sha256(key.public_bytes_raw()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def write_public_key(key: PublicKey, path: Path) -> None:
    """Write :func:`public_key_text` and a newline to ``path`` (mode 0644)."""
    write_text_atomic(Path(path), public_key_text(key) + "\n", mode=_PUBLIC_MODE)


def read_public_key(path: Path) -> PublicKey:
    """Load a public key file written by :func:`write_public_key`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: public key file not found") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a public key file (non-ASCII content)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key file: {exc.strerror}") from None
    return parse_public_key(text.strip(), source=str(path))


def init_site_keys(site: str, out_dir: Path, *, passphrase: bytes | None) -> tuple[Path, Path]:
    """Create a site's key pair as ``out_dir/<site>.key`` (0600) and ``out_dir/<site>.pub``.

    ``site`` is 1-64 letters, digits, ``-``, ``_`` or ``.``. Nothing is written if either
    file already exists. Returns ``(private_path, public_path)``.
    """
    if not _SITE_NAME.fullmatch(site):
        raise KeyFileError(
            f"site name {site!r}: must be 1-64 characters, each a letter, digit, '-', '_' or '.'"
        )
    out_dir = Path(out_dir)
    private_path = out_dir / f"{site}.key"
    public_path = out_dir / f"{site}.pub"
    for existing in (private_path, public_path):
        if os.path.lexists(existing):
            raise KeyFileError(f"{existing}: already exists; refusing to replace a site's keys")
    key = generate_private_key()
    write_private_key(key, private_path, passphrase=passphrase)
    write_public_key(key.public_key(), public_path)
    return private_path, public_path
