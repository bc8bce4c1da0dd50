"""The deployment's TLS and node-key material, checked with the tools that consume it."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedsilo.cli.main import main
from fedsilo.crypto import KeyFileError, private_key_is_encrypted
from fedsilo.crypto.certs import (
    create_ca,
    init_coordinator_tls,
    init_node_keys,
    issue_server_cert,
    node_key_fingerprint,
    node_public_key_pem,
    parse_node_public_key,
    parse_san,
    read_ca_certificate,
    read_certificate,
    read_node_private_key,
)


def _verify(chain_path: Path, ca_path: Path, host: str, *, at: datetime.datetime | None = None):
    certs = x509.load_pem_x509_certificates(chain_path.read_bytes())
    store = Store([read_certificate(ca_path)])
    builder = PolicyBuilder().store(store)
    if at is not None:
        builder = builder.time(at)
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = builder.build_server_verifier(subject)
    return verifier.verify(certs[0], certs[1:])


def test_init_makes_a_ca_and_a_server_chain_valid_for_every_san(tmp_path: Path) -> None:
    tls = init_coordinator_tls(
        tmp_path, sans=("localhost", "127.0.0.1", "coord.example.org", "10.0.0.5"), valid_days=30
    )

    for host in ("localhost", "127.0.0.1", "coord.example.org", "10.0.0.5"):
        _verify(tls.server_cert, tls.ca_cert, host)
    assert tls.ca_key.stat().st_mode & 0o777 == 0o600
    assert tls.server_key.stat().st_mode & 0o777 == 0o600


def test_a_name_outside_the_sans_is_refused(tmp_path: Path) -> None:
    tls = init_coordinator_tls(tmp_path, sans=("localhost",), valid_days=30)

    with pytest.raises(VerificationError):
        _verify(tls.server_cert, tls.ca_cert, "evil.example.org")


def test_python_ssl_accepts_the_chain_against_the_ca_only(tmp_path: Path) -> None:
    tls = init_coordinator_tls(tmp_path, sans=("localhost",), valid_days=30)
    context = ssl.create_default_context(cafile=str(tls.ca_cert))

    context.load_cert_chain(tls.server_cert, tls.server_key)  # the key matches the cert

    other = init_coordinator_tls(tmp_path / "other", sans=("localhost",), valid_days=30)
    with pytest.raises(VerificationError):
        _verify(tls.server_cert, other.ca_cert, "localhost")


def test_an_expired_certificate_fails_verification(tmp_path: Path) -> None:
    ca_key, ca_cert = create_ca(common_name="t CA", valid_days=30)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    _key, cert = issue_server_cert(
        ca_key, ca_cert, common_name="t", sans=("localhost",), valid_days=1, not_before=past
    )
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    with pytest.raises(VerificationError):
        _verify(tmp_path / "s.pem", tmp_path / "ca.pem", "localhost")


def test_existing_material_is_never_replaced(tmp_path: Path) -> None:
    init_coordinator_tls(tmp_path, sans=("localhost",), valid_days=30)
    before = (tmp_path / "ca.pem").read_bytes()

    with pytest.raises(KeyFileError, match="already exists"):
        init_coordinator_tls(tmp_path, sans=("localhost",), valid_days=30)
    assert (tmp_path / "ca.pem").read_bytes() == before


def test_sans_parse_as_ip_or_dns_and_refuse_junk() -> None:
    assert isinstance(parse_san("10.1.2.3"), x509.IPAddress)
    assert isinstance(parse_san("::1"), x509.IPAddress)
    assert isinstance(parse_san("coord.example.org"), x509.DNSName)
    with pytest.raises(ValueError, match="neither"):
        parse_san("not a name")


def test_node_keys_are_p384_openssh_and_match_ssh_keygen(tmp_path: Path) -> None:
    private_path, public_path = init_node_keys("st-mary", tmp_path)

    key = read_node_private_key(private_path)
    public = parse_node_public_key(public_path.read_text(), source="pub")
    assert isinstance(key.curve, ec.SECP384R1)
    assert node_public_key_pem(public) == node_public_key_pem(key.public_key())
    assert private_path.stat().st_mode & 0o777 == 0o600
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen is not installed")
    shown = subprocess.run([keygen, "-lf", str(public_path)], capture_output=True, text=True)
    assert node_key_fingerprint(public) in shown.stdout


def test_flower_loads_our_node_key_files(tmp_path: Path) -> None:
    # What flower-supernode (--auth-supernode-private-key) and `flwr supernode register` read.
    from flwr.cli.supernode.register import try_load_public_key

    private_path, public_path = init_node_keys("site", tmp_path)
    loaded = serialization.load_ssh_private_key(private_path.read_bytes(), None)

    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert try_load_public_key(public_path) == node_public_key_pem(loaded.public_key())


def test_an_ed25519_or_p256_key_is_not_a_node_key(tmp_path: Path) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    text = p256.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    with pytest.raises(KeyFileError, match="ecdsa-sha2-nistp384"):
        parse_node_public_key(text.decode(), source="federation.sites[0].node_public_key")
    with pytest.raises(KeyFileError, match=r"sites\[0\]"):
        parse_node_public_key("ssh-ed25519 AAAA", source="federation.sites[0].node_public_key")


def test_cli_certs_init_and_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coordinator, site = tmp_path / "coordinator", tmp_path / "site"

    assert main(["certs", "init", "--out", str(coordinator), "--san", "coord.example.org"]) == 0
    ca = coordinator / "ca.pem"
    command = ["certs", "site", "--name", "st-mary", "--out", str(site), "--ca", str(ca)]
    assert main(command) == 2  # the signing key is encrypted by default: no passphrase, no key
    assert not (site / "st-mary.key").exists()
    secret = tmp_path / "passphrase"
    secret.write_text("st-mary's long passphrase\n")
    secret.chmod(0o600)
    assert main([*command, "--passphrase-file", str(secret)]) == 0

    assert private_key_is_encrypted(site / "st-mary.key")
    _verify(coordinator / "coordinator.pem", site / "ca.pem", "coord.example.org")
    names = sorted(p.name for p in site.iterdir())
    assert names == [
        "ca.pem",
        "st-mary.enroll.toml",
        "st-mary.key",
        "st-mary.node.key",
        "st-mary.node.pub",
        "st-mary.pub",
    ]
    enrollment = (site / "st-mary.enroll.toml").read_text()
    assert (site / "st-mary.node.pub").read_text().strip() in enrollment
    assert (site / "st-mary.pub").read_text().strip() in enrollment
    out = capsys.readouterr().out
    assert "coord.example.org" in out and "SHA256:" in out
    assert main(["certs", "init", "--out", str(coordinator)]) == 2  # never replaced


def test_a_ca_file_must_hold_exactly_one_ca_certificate(tmp_path: Path) -> None:
    # TLS trusts every certificate of the file while the fingerprint shown is the first one's:
    # a second CA appended to the federation's would be trusted unseen.
    federation = init_coordinator_tls(tmp_path / "federation", sans=("127.0.0.1",), valid_days=9)
    other = init_coordinator_tls(tmp_path / "other", sans=("127.0.0.1",), valid_days=9)
    appended = tmp_path / "appended.pem"
    appended.write_bytes(federation.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    secret = tmp_path / "passphrase"
    secret.write_text("st-mary's long passphrase\n")
    secret.chmod(0o600)

    certificate, data = read_ca_certificate(federation.ca_cert)
    assert data == federation.ca_cert.read_bytes()
    assert certificate == read_certificate(federation.ca_cert)
    with pytest.raises(KeyFileError, match=r"appended\.pem: holds 2 certificates"):
        read_ca_certificate(appended)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(
        read_certificate(federation.server_cert).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(KeyFileError, match=r"leaf\.pem: the certificate is not a CA certificate"):
        read_ca_certificate(leaf)
    site = tmp_path / "site"
    command = ["certs", "site", "--name", "st-mary", "--out", str(site), "--ca", str(appended)]
    assert main([*command, "--passphrase-file", str(secret)]) == 2
    assert not (site / "ca.pem").exists()
