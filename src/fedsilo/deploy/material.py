"""What `fedsilo certs init` and `fedsilo certs site` create, and what each side is given.

Coordinator (``certs init --out DIR``): ``ca.pem``/``ca.key`` (the federation's private CA),
``coordinator.pem``/``coordinator.key`` (its TLS server certificate for the configured names),
and ``coordinator-signing.key``/``.pub`` (the Ed25519 key that signs
the ledger and the sites' receipts). Only ``ca.pem`` and ``coordinator-signing.pub`` leave it.

Site (``certs site --name NAME --out DIR``): ``NAME.key``/``NAME.pub`` (the site's Ed25519
identity, signs its updates), ``NAME.node.key``/``NAME.node.pub`` (its SuperNode authentication
key for Flower) and ``NAME.enroll.toml``, the ``[[federation.sites]]`` entry the site sends to
the coordinator. Private keys never leave the machine that made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedsilo.crypto import (
    fingerprint,
    init_site_keys,
    private_key_is_encrypted,
    public_key_text,
    read_public_key,
)
from fedsilo.crypto.certs import (
    CoordinatorTls,
    certificate_fingerprint,
    init_coordinator_tls,
    init_node_keys,
    node_key_fingerprint,
    parse_node_public_key,
    read_ca_certificate,
    read_certificate,
)
from fedsilo.storage import write_bytes_atomic, write_text_atomic

COORDINATOR_SIGNING = "coordinator-signing"


@dataclass(frozen=True)
class CoordinatorMaterial:
    tls: CoordinatorTls
    signing_key: Path
    signing_public: Path

    def describe(self) -> list[str]:
        ca = read_certificate(self.tls.ca_cert)
        server = read_certificate(self.tls.server_cert)
        return [
            f"CA certificate:      {self.tls.ca_cert}  {certificate_fingerprint(ca)}",
            f"CA private key:      {self.tls.ca_key} (mode 0600; keep offline)",
            f"TLS certificate:     {self.tls.server_cert}  {certificate_fingerprint(server)}",
            f"TLS private key:     {self.tls.server_key} (mode 0600)",
            f"signing key:         {self.signing_key} (mode 0600)",
            f"signing public key:  {self.signing_public}  "
            f"{fingerprint(read_public_key(self.signing_public))}",
            "give every site ca.pem and coordinator-signing.pub; nothing else leaves this folder",
        ]


def init_coordinator_material(
    out_dir: Path, *, sans: tuple[str, ...], valid_days: int, federation: str
) -> CoordinatorMaterial:
    """Create the coordinator's CA, TLS certificate and Ed25519 signing key in ``out_dir``."""
    tls = init_coordinator_tls(out_dir, sans=sans, valid_days=valid_days, federation=federation)
    signing_key, signing_public = init_site_keys(COORDINATOR_SIGNING, out_dir, passphrase=None)
    return CoordinatorMaterial(tls, signing_key, signing_public)


@dataclass(frozen=True)
class SiteMaterial:
    name: str
    signing_key: Path
    signing_public: Path
    node_key: Path
    node_public: Path
    enrollment: Path
    ca_cert: Path | None

    def describe(self) -> list[str]:
        node = parse_node_public_key(self.node_public.read_text(), source=str(self.node_public))
        lines = [
            f"site {self.name}",
            f"signing key:        {self.signing_key} (mode 0600"
            f"{', passphrase-encrypted' if private_key_is_encrypted(self.signing_key) else ''})",
            f"signing public key: {self.signing_public}  "
            f"{fingerprint(read_public_key(self.signing_public))}",
            f"node key:           {self.node_key} (mode 0600, for flower-supernode)",
            f"node public key:    {self.node_public}  {node_key_fingerprint(node)}",
            f"enrollment request: {self.enrollment} (send it to the coordinator)",
        ]
        if self.ca_cert is not None:
            lines.append(f"federation CA:      {self.ca_cert}")
        return lines


def init_site_material(
    name: str, out_dir: Path, *, ca_cert: Path | None, passphrase: bytes | None
) -> SiteMaterial:
    """Create a site's identity and node keys and its enrollment request in ``out_dir``.

    The signing key is encrypted with ``passphrase`` (scrypt); None writes it unencrypted,
    which the caller must have been asked for explicitly.
    """
    out_dir = Path(out_dir)
    signing_key, signing_public = init_site_keys(name, out_dir, passphrase=passphrase)
    node_key, node_public = init_node_keys(name, out_dir)
    entry = {
        "federation": {
            "sites": [
                {
                    "name": name,
                    "public_key": public_key_text(read_public_key(signing_public)),
                    "node_public_key": node_public.read_text(encoding="ascii").strip(),
                }
            ]
        }
    }
    enrollment = out_dir / f"{name}.enroll.toml"
    write_text_atomic(
        enrollment,
        f"# enrollment request of site {name}: the coordinator adds this entry to its config\n"
        + tomli_w.dumps(entry),
    )
    copied = None
    if ca_cert is not None:
        # Read once and checked (one CA certificate), then the same bytes written.
        _, ca_bytes = read_ca_certificate(ca_cert)
        copied = out_dir / "ca.pem"
        if Path(ca_cert).resolve() != copied.resolve():
            write_bytes_atomic(copied, ca_bytes)
    return SiteMaterial(
        name, signing_key, signing_public, node_key, node_public, enrollment, copied
    )
