"""Who belongs to a federation: its id, the run, the coordinator's key and each site's pinned key.

Stored as RUN/federation.json when a run starts. Signatures bind the federation id and run id,
so an update signed for one run or federation is refused in another; a site is admitted only
if its name is pinned here with the public key its updates verify against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.crypto import PublicKey, fingerprint, parse_public_key
from fedsilo.storage import read_json_object, write_text_atomic


class MembershipError(ValueError):
    """A federation membership file that cannot be used; names the file and the field."""


@dataclass(frozen=True)
class Membership:
    """The pinned identities of one run."""

    federation_id: str
    run_id: str
    coordinator_key_path: Path  # the coordinator's private key, on the coordinator's machine
    coordinator_public_key: str  # "ed25519:..." text
    site_public_keys: Mapping[str, str]  # site name -> "ed25519:..." text

    def coordinator_key(self) -> PublicKey:
        return parse_public_key(self.coordinator_public_key, source="coordinator public key")

    def site_keys(self) -> dict[str, PublicKey]:
        return {
            name: parse_public_key(text, source=f"public key of site {name!r}")
            for name, text in self.site_public_keys.items()
        }

    def fingerprints(self) -> dict[str, str]:
        """Key fingerprints by site name, for display and reports."""
        return {name: fingerprint(key) for name, key in self.site_keys().items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "federation_id": self.federation_id,
            "run_id": self.run_id,
            "coordinator_key_path": str(self.coordinator_key_path),
            "coordinator_public_key": self.coordinator_public_key,
            "sites": dict(sorted(self.site_public_keys.items())),
        }


def save_membership(membership: Membership, path: Path) -> None:
    """Write the membership file atomically."""
    write_text_atomic(path, json.dumps(membership.to_json(), indent=2) + "\n")


def load_membership(path: Path) -> Membership:
    """Read and check a membership file (every key must parse)."""
    try:
        data = read_json_object(Path(path))
    except FileNotFoundError:
        raise MembershipError(f"{path}: federation membership file not found") from None
    except ValueError as error:
        raise MembershipError(str(error)) from None
    text_fields = ("federation_id", "run_id", "coordinator_key_path", "coordinator_public_key")
    missing = [name for name in (*text_fields, "sites") if name not in data]
    if missing:
        raise MembershipError(f"{path}: missing fields {missing}")
    not_text = [name for name in text_fields if not isinstance(data[name], str)]
    if not_text:
        raise MembershipError(f"{path}: fields {not_text} must be text")
    sites = data["sites"]
    if not isinstance(sites, dict) or not all(isinstance(v, str) for v in sites.values()):
        raise MembershipError(f"{path}: 'sites' must map site names to public key texts")
    membership = Membership(
        federation_id=str(data["federation_id"]),
        run_id=str(data["run_id"]),
        coordinator_key_path=Path(data["coordinator_key_path"]),
        coordinator_public_key=str(data["coordinator_public_key"]),
        site_public_keys=sites,
    )
    membership.coordinator_key()
    membership.site_keys()
    return membership
