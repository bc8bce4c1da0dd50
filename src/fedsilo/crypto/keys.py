"""Site identity keys: Ed25519 key pairs, their files, their text form and fingerprints.

A site (or the coordinator) is identified by an Ed25519 key pair. The private key lives in a
file readable only by its owner: PEM PKCS#8, or, encrypted with a passphrase, the PKCS#8 bytes
sealed with AES-256-GCM under a key that scrypt derives from the passphrase (the
``FEDSILO SCRYPT PRIVATE KEY`` block below). The public key travels as one line of text,
``ed25519:<base64 of the 32 raw bytes>``, and is compared by eye through its OpenSSH-style
fingerprint, ``SHA256:<unpadded base64 of sha256(raw bytes)>``.

Encrypted key file (base64 of a JSON object between the PEM-style lines)::

    -----BEGIN FEDSILO SCRYPT PRIVATE KEY-----
    {"kdf": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": b64(16 bytes),
     "nonce": b64(12 bytes), "ciphertext": b64(AES-256-GCM(PKCS#8 DER, aad=KEY_AAD))}
    -----END FEDSILO SCRYPT PRIVATE KEY-----

scrypt at n = 2**17, r = 8 (128 MiB, about a second) is the work factor OWASP recommends;
reading accepts n from 2**15 to 2**20 only, so a crafted file cannot ask for unbounded memory.
Keys encrypted by earlier versions (PKCS#8 ``ENCRYPTED PRIVATE KEY``, PBKDF2 with few
iterations) still load with their passphrase; re-create them to get the stronger encryption.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedsilo.storage import write_bytes_atomic, write_text_atomic

PrivateKey: TypeAlias = Ed25519PrivateKey
PublicKey: TypeAlias = Ed25519PublicKey

PUBLIC_KEY_PREFIX = "ed25519:"
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_ENCRYPTED_PEM_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_SCRYPT_BEGIN = b"-----BEGIN FEDSILO SCRYPT PRIVATE KEY-----"
_SCRYPT_END = b"-----END FEDSILO SCRYPT PRIVATE KEY-----"
KEY_AAD = b"fedsilo ed25519 private key v1"
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_N_RANGE = (2**15, 2**20)
MIN_PASSPHRASE_BYTES = 12
PASSPHRASE_ENV = "FEDSILO_KEY_PASSPHRASE"
"""Environment variable a deployed site or coordinator may take its key passphrase from."""
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


def write_private_key(
    key: PrivateKey, path: Path, *, passphrase: bytes | None, scrypt_n: int = SCRYPT_N
) -> None:
    """Write ``key`` to a new file at ``path`` with mode 0600.

    With a ``passphrase`` (at least MIN_PASSPHRASE_BYTES bytes) the file is the scrypt and
    AES-256-GCM block of the module docstring; ``passphrase=None`` writes unencrypted PEM
    PKCS#8, relying on the file mode alone. ``scrypt_n`` is the work factor (a power of two in
    the range reading accepts). An existing file is never replaced: losing a private key loses
    the identity.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a private key")
    if passphrase is None:
        data = key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
    else:
        check_passphrase(passphrase, source=str(path))
        data = _seal(key, passphrase, scrypt_n=scrypt_n)
    write_bytes_atomic(path, data, mode=_PRIVATE_MODE)
    # Some filesystems ignore chmod; a key they expose must not pass silently.
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != _PRIVATE_MODE:
        raise KeyFileError(f"{path}: written with mode {mode:04o} instead of 0600")


def check_passphrase(passphrase: bytes, *, source: str) -> None:
    """Refuse a passphrase shorter than MIN_PASSPHRASE_BYTES (``source`` names its origin)."""
    if len(passphrase) < MIN_PASSPHRASE_BYTES:
        raise KeyFileError(
            f"{source}: the passphrase has {len(passphrase)} bytes; at least "
            f"{MIN_PASSPHRASE_BYTES} are required"
        )


def _scrypt_key(passphrase: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def _seal(key: PrivateKey, passphrase: bytes, *, scrypt_n: int) -> bytes:
    low, high = _SCRYPT_N_RANGE
    if not low <= scrypt_n <= high or scrypt_n & (scrypt_n - 1):
        raise KeyFileError(f"scrypt n={scrypt_n}: must be a power of two in [{low}, {high}]")
    salt, nonce = os.urandom(16), os.urandom(12)
    der = key.private_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    sealed = AESGCM(_scrypt_key(passphrase, salt, scrypt_n)).encrypt(nonce, der, KEY_AAD)
    body = json.dumps(
        {
            "kdf": "scrypt",
            "n": scrypt_n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode("ascii"),
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "ciphertext": base64.b64encode(sealed).decode("ascii"),
        },
        sort_keys=True,
    ).encode("ascii")
    text = base64.encodebytes(body)
    return _SCRYPT_BEGIN + b"\n" + text + _SCRYPT_END + b"\n"


def _open_sealed(data: bytes, path: Path, passphrase: bytes) -> bytes:
    """The PKCS#8 DER inside a sealed key file; every failure is a KeyFileError."""
    inner = data.strip()[len(_SCRYPT_BEGIN) :]
    if not inner.rstrip().endswith(_SCRYPT_END):
        raise KeyFileError(f"{path}: damaged encrypted key file (no end line)")
    try:
        fields = json.loads(base64.decodebytes(inner.rstrip()[: -len(_SCRYPT_END)]))
        n, r, p = fields["n"], fields["r"], fields["p"]
        salt = base64.b64decode(fields["salt"], validate=True)
        nonce = base64.b64decode(fields["nonce"], validate=True)
        sealed = base64.b64decode(fields["ciphertext"], validate=True)
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise KeyFileError(f"{path}: damaged encrypted key file") from None
    low, high = _SCRYPT_N_RANGE
    valid_n = isinstance(n, int) and low <= n <= high and not n & (n - 1)
    if fields.get("kdf") != "scrypt" or not valid_n or (r, p) != (SCRYPT_R, SCRYPT_P):
        raise KeyFileError(
            f"{path}: unsupported key encryption parameters (kdf scrypt, n a power of two in "
            f"[{low}, {high}], r={SCRYPT_R}, p={SCRYPT_P} are read)"
        )
    if len(salt) != 16 or len(nonce) != 12:
        raise KeyFileError(f"{path}: damaged encrypted key file (salt or nonce length)")
    try:
        return AESGCM(_scrypt_key(passphrase, salt, n)).decrypt(nonce, sealed, KEY_AAD)
    except InvalidTag:
        raise KeyFileError(f"{path}: wrong passphrase (or a damaged key file)") from None


def read_private_key(path: Path, *, passphrase: bytes | None) -> PrivateKey:
    """Load the Ed25519 private key in the PEM PKCS#8 file at ``path``.

    Like ssh, a file that its group or others may access is refused. ``passphrase`` must be
    given exactly when the file is encrypted. Every failure is a :class:`KeyFileError`.
    """
    path = Path(path)
    _check_owner_only(path, what="private key")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read private key file: {exc.strerror}") from None
    return _load_private_pem(data, path, passphrase)


def _check_owner_only(path: Path, *, what: str) -> None:
    """Refuse (KeyFileError) a secret's file that is missing, not a regular file, or that its
    group or others may access."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: permissions {mode:04o} are too open; a {what} must be accessible only "
            f"by its owner (chmod 600 {path})"
        )


def _load_private_pem(data: bytes, path: Path, passphrase: bytes | None) -> PrivateKey:
    sealed = data.lstrip().startswith(_SCRYPT_BEGIN)
    encrypted = sealed or _ENCRYPTED_PEM_HEADER in data
    if encrypted and passphrase is None:
        raise KeyFileError(
            f"{path}: the private key is encrypted and no passphrase was given (a deployed "
            f"site reads it from [site] passphrase_file or the {PASSPHRASE_ENV} variable)"
        )
    if not encrypted and passphrase is not None:
        # Refused rather than ignored: whoever expected an encrypted key should learn it is not.
        raise KeyFileError(f"{path}: a passphrase was given but the private key is not encrypted")
    # Opened outside the try: its KeyFileError (a ValueError) says what is wrong.
    der = _open_sealed(data, path, passphrase) if sealed and passphrase is not None else b""
    try:
        if sealed:
            key = serialization.load_der_private_key(der, password=None)
        else:
            # Unencrypted PEM, or PKCS#8 encrypted by earlier versions (still read).
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


def private_key_is_encrypted(path: Path) -> bool:
    """Whether the private key file at ``path`` is passphrase-encrypted (either format)."""
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(64).lstrip()
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read private key file: {error.strerror}") from None
    return head.startswith((_SCRYPT_BEGIN, _ENCRYPTED_PEM_HEADER))


def read_passphrase(file: Path | None, *, source: str) -> bytes | None:
    """A key passphrase from ``file`` (trailing newline dropped), else from the
    PASSPHRASE_ENV environment variable, else None; ``source`` names who asks, in errors.

    For unattended starts: the file or the variable is set by whoever starts the service.
    The file, like a private key, must be accessible by its owner only (it unlocks one). A
    passphrase shorter than MIN_PASSPHRASE_BYTES is refused.
    """
    if file is not None:
        _check_owner_only(Path(file), what="passphrase")
        try:
            passphrase = Path(file).read_bytes().rstrip(b"\r\n")
        except OSError as error:
            raise KeyFileError(
                f"{file}: cannot read the passphrase file: {error.strerror}"
            ) from None
        check_passphrase(passphrase, source=str(file))
        return passphrase
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        return None
    passphrase = value.encode("utf-8")
    check_passphrase(passphrase, source=f"{source}: {PASSPHRASE_ENV}")
    return passphrase


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
