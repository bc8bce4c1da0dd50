from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.crypto import (
    PASSPHRASE_ENV,
    KeyFileError,
    PrivateKey,
    fingerprint,
    generate_private_key,
    init_site_keys,
    parse_public_key,
    private_key_from_seed,
    public_key_text,
    read_passphrase,
    read_private_key,
    read_public_key,
    write_private_key,
    write_public_key,
)

PASSPHRASE = b"correct horse battery staple"


def raw(key: PrivateKey) -> bytes:
    return key.private_bytes_raw()


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def key() -> PrivateKey:
    return private_key_from_seed(bytes(range(32)))


def test_generated_keys_differ() -> None:
    assert raw(generate_private_key()) != raw(generate_private_key())


def test_seed_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        private_key_from_seed(bytes(31))


@pytest.mark.usefixtures("permissive_umask")
def test_private_key_file_has_mode_0600_under_permissive_umask(
    key: PrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "site.key"

    write_private_key(key, path, passphrase=None)

    assert mode_of(path) == 0o600


def test_unencrypted_private_key_round_trip(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=None)

    loaded = read_private_key(path, passphrase=None)

    assert raw(loaded) == raw(key)


def test_unencrypted_private_key_is_pkcs8_pem(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"

    write_private_key(key, path, passphrase=None)

    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_passphrase_round_trip(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=PASSPHRASE)

    loaded = read_private_key(path, passphrase=PASSPHRASE)

    assert raw(loaded) == raw(key)


def test_passphrase_encrypts_the_file(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"

    write_private_key(key, path, passphrase=PASSPHRASE)

    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN FEDSILO SCRYPT PRIVATE KEY-----\n")
    assert raw(key) not in text and raw(key) not in base64.decodebytes(text.splitlines()[1])


def test_wrong_passphrase_is_refused(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=PASSPHRASE)

    with pytest.raises(KeyFileError, match="wrong passphrase") as caught:
        read_private_key(path, passphrase=b"wrong")

    assert str(path) in str(caught.value)


def test_missing_passphrase_is_refused(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=PASSPHRASE)

    with pytest.raises(KeyFileError, match="encrypted and no passphrase"):
        read_private_key(path, passphrase=None)


def test_passphrase_for_unencrypted_key_is_refused(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=None)

    with pytest.raises(KeyFileError, match="not encrypted"):
        read_private_key(path, passphrase=PASSPHRASE)


def test_empty_passphrase_is_refused(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"

    with pytest.raises(KeyFileError, match="has 0 bytes; at least 12"):
        write_private_key(key, path, passphrase=b"")

    assert not path.exists()


def test_existing_private_key_is_not_overwritten(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=None)
    before = path.read_bytes()

    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(generate_private_key(), path, passphrase=None)

    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_too_open_permissions_are_refused(key: PrivateKey, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=None)
    path.chmod(mode)

    with pytest.raises(KeyFileError, match=f"permissions {mode:04o} are too open.*chmod 600"):
        read_private_key(path, passphrase=None)


def test_owner_read_only_permissions_are_accepted(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=None)
    path.chmod(0o400)

    assert raw(read_private_key(path, passphrase=None)) == raw(key)


def test_missing_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"

    with pytest.raises(KeyFileError, match=re.escape(f"{path}: private key file not found")):
        read_private_key(path, passphrase=None)


def test_folder_is_not_a_private_key(tmp_path: Path) -> None:
    path = tmp_path / "folder.key"
    path.mkdir(mode=0o700)

    with pytest.raises(KeyFileError, match="not a regular file"):
        read_private_key(path, passphrase=None)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "text", "broken-pem"],
)
def test_non_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(content)
    path.chmod(0o600)

    with pytest.raises(KeyFileError, match="not a PEM private key"):
        read_private_key(path, passphrase=None)


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)

    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        read_private_key(path, passphrase=None)


def test_public_key_text_round_trip(key: PrivateKey) -> None:
    public = key.public_key()

    parsed = parse_public_key(public_key_text(public))

    assert parsed.public_bytes_raw() == public.public_bytes_raw()


_VALID_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ssh-ed25519 " + _VALID_B64, "does not start with"),
        ("ED25519:" + _VALID_B64, "does not start with"),
        ("ed25519:", "32 bytes, got 0"),
        ("ed25519:not base64!", "not valid base64"),
        ("ed25519:" + base64.b64encode(bytes(31)).decode(), "32 bytes, got 31"),
        ("ed25519:" + base64.b64encode(bytes(33)).decode(), "32 bytes, got 33"),
        ("ed25519:" + _VALID_B64.rstrip("="), "not valid base64"),
        ("ed25519:" + _VALID_B64[:-2] + "B=", "not canonical"),
        ("ed25519:" + _VALID_B64 + " ", "not valid base64"),
    ],
    ids=[
        "ssh-format",
        "upper-prefix",
        "empty",
        "garbage",
        "31-bytes",
        "33-bytes",
        "unpadded",
        "non-canonical",
        "trailing-space",
    ],
)
def test_bad_public_key_text_is_refused(text: str, problem: str) -> None:
    with pytest.raises(KeyFileError, match=f"^coordinator.pub: .*{problem}"):
        parse_public_key(text, source="coordinator.pub")


def test_fingerprint_format(key: PrivateKey) -> None:
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint(key.public_key()))


def test_fingerprints_of_different_keys_differ() -> None:
    first = generate_private_key().public_key()
    second = generate_private_key().public_key()

    assert fingerprint(first) != fingerprint(second)


def test_public_key_file_content_and_mode(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.pub"

    write_public_key(key.public_key(), path)

    assert path.read_text() == public_key_text(key.public_key()) + "\n"
    assert mode_of(path) == 0o644


def test_public_key_file_round_trip(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.pub"
    write_public_key(key.public_key(), path)

    loaded = read_public_key(path)

    assert loaded.public_bytes_raw() == key.public_key().public_bytes_raw()


def test_missing_public_key_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pub"

    with pytest.raises(KeyFileError, match=re.escape(f"{path}: public key file not found")):
        read_public_key(path)


def test_bad_public_key_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.pub"
    path.write_text("ed25519:AAAA\n")

    with pytest.raises(KeyFileError, match=re.escape(f"{path}: an Ed25519 public key is 32")):
        read_public_key(path)


@pytest.mark.usefixtures("permissive_umask")
def test_init_site_keys_writes_a_matching_pair(tmp_path: Path) -> None:
    private_path, public_path = init_site_keys("st-mary", tmp_path, passphrase=None)

    private = read_private_key(private_path, passphrase=None)
    assert (private_path.name, public_path.name) == ("st-mary.key", "st-mary.pub")
    assert mode_of(private_path) == 0o600
    assert read_public_key(public_path).public_bytes_raw() == (
        private.public_key().public_bytes_raw()
    )


def test_init_site_keys_encrypts_with_passphrase(tmp_path: Path) -> None:
    private_path, _ = init_site_keys("st-mary", tmp_path, passphrase=PASSPHRASE)

    with pytest.raises(KeyFileError, match="encrypted and no passphrase"):
        read_private_key(private_path, passphrase=None)


@pytest.mark.parametrize("suffix", [".key", ".pub"])
def test_init_site_keys_refuses_existing_files(tmp_path: Path, suffix: str) -> None:
    (tmp_path / f"st-mary{suffix}").write_text("existing\n")

    with pytest.raises(KeyFileError, match=f"st-mary{re.escape(suffix)}: already exists"):
        init_site_keys("st-mary", tmp_path, passphrase=None)

    assert sorted(p.name for p in tmp_path.iterdir()) == [f"st-mary{suffix}"]


@pytest.mark.parametrize(
    "site",
    ["", "a/b", "../evil", "st mary", "st-mary\n", "h\u00f4pital", "x" * 65],
    ids=["empty", "slash", "traversal", "space", "newline", "non-ascii", "too-long"],
)
def test_init_site_keys_refuses_bad_site_name(tmp_path: Path, site: str) -> None:
    with pytest.raises(KeyFileError, match="site name"):
        init_site_keys(site, tmp_path, passphrase=None)

    assert list(tmp_path.iterdir()) == []


def test_init_site_keys_accepts_every_allowed_character(tmp_path: Path) -> None:
    site = "Az09._-" + "x" * 57

    private_path, _ = init_site_keys(site, tmp_path, passphrase=None)

    assert private_path.name == f"{site}.key"


def test_short_passphrase_is_refused(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"

    with pytest.raises(KeyFileError, match="has 1 bytes; at least 12"):
        write_private_key(key, path, passphrase=b"x")

    assert not path.exists()


def test_passphrase_key_uses_scrypt_with_a_real_work_factor(
    key: PrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=PASSPHRASE)

    body = b"".join(path.read_bytes().splitlines()[1:-1])
    fields = json.loads(base64.b64decode(body))

    assert fields["kdf"] == "scrypt"
    assert fields["n"] >= 2**17 and fields["r"] == 8


def test_crafted_work_factor_is_refused_before_deriving(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(key, path, passphrase=PASSPHRASE)
    lines = path.read_bytes().splitlines()
    fields = json.loads(base64.b64decode(b"".join(lines[1:-1])))
    fields["n"] = 2**40  # would ask scrypt for 128 TiB
    forged = base64.encodebytes(json.dumps(fields).encode())
    path.chmod(0o600)
    path.write_bytes(lines[0] + b"\n" + forged + lines[-1] + b"\n")

    with pytest.raises(KeyFileError, match="unsupported key encryption parameters"):
        read_private_key(path, passphrase=PASSPHRASE)


def test_key_encrypted_by_earlier_versions_still_loads(key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "old.key"
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.BestAvailableEncryption(PASSPHRASE),
    )
    path.write_bytes(pem)
    path.chmod(0o600)

    assert raw(read_private_key(path, passphrase=PASSPHRASE)) == raw(key)


def test_passphrase_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "passphrase"
    file.write_bytes(PASSPHRASE + b"\n")
    file.chmod(0o600)
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)

    assert read_passphrase(file, source="site") == PASSPHRASE
    assert read_passphrase(None, source="site") is None
    monkeypatch.setenv(PASSPHRASE_ENV, "short")
    with pytest.raises(KeyFileError, match=PASSPHRASE_ENV):
        read_passphrase(None, source="site")


def test_deployed_site_key_decrypts_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.deploy.site_model import read_site_key

    key = generate_private_key()
    write_private_key(key, tmp_path / "st-mary.key", passphrase=PASSPHRASE)
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    with pytest.raises(KeyFileError, match=PASSPHRASE_ENV):
        read_site_key(tmp_path / "st-mary.key", passphrase_file=None)

    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE.decode())

    assert raw(read_site_key(tmp_path / "st-mary.key", passphrase_file=None)) == raw(key)


def test_deployed_site_key_decrypts_with_the_policy_passphrase_file(tmp_path: Path) -> None:
    from fedsilo.deploy.site_model import read_site_key

    key = generate_private_key()
    write_private_key(key, tmp_path / "st-mary.key", passphrase=PASSPHRASE)
    (tmp_path / "passphrase").write_bytes(PASSPHRASE + b"\n")
    (tmp_path / "passphrase").chmod(0o600)

    loaded = read_site_key(tmp_path / "st-mary.key", passphrase_file=tmp_path / "passphrase")

    assert raw(loaded) == raw(key)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_passphrase_file_others_may_read_is_refused_like_a_private_key(
    tmp_path: Path, mode: int
) -> None:
    file = tmp_path / "passphrase"
    file.write_bytes(PASSPHRASE + b"\n")
    file.chmod(mode)

    with pytest.raises(KeyFileError, match=f"permissions {mode:04o} are too open; a passphrase"):
        read_passphrase(file, source="site")
