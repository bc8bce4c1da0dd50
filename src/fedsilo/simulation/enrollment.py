"""Key enrollment for a simulated federation: every site and the coordinator get a key pair.

In a real deployment each site creates its key (`fedsilo keys init`) and the coordinator pins
the public key in the federation config ([[federation.sites]]). A simulation can do the same
(with `federation.keys_dir` holding the sites' private keys), or leave the pins out: then the
run folder stands in for every machine, with each site's key pair in RUN/sites/NAME/ (the
site's own storage, where its receipts go too) and the coordinator's in RUN/coordinator/.
Keys are created once and reused when the run resumes.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from fedsilo.config import FederationSection
from fedsilo.crypto import (
    KeyFileError,
    init_site_keys,
    public_key_text,
    read_private_key,
    read_public_key,
)
from fedsilo.server.membership import Membership, load_membership, save_membership

COORDINATOR = "coordinator"


def site_folder(run_dir: Path, site: str) -> Path:
    """A simulated site's own storage: its receipts, and its key pair unless keys are pinned."""
    return Path(run_dir) / "sites" / site


def site_key_path(run_dir: Path, federation: FederationSection, site: str) -> Path:
    """Where a simulated site's private key is."""
    folder = federation.keys_dir if federation.keys_dir is not None else site_folder(run_dir, site)
    return folder / f"{site}.key"


def _key_pair(folder: Path, name: str) -> tuple[Path, str]:
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if not private.exists():
        folder.mkdir(parents=True, exist_ok=True)
        private, public = init_site_keys(name, folder, passphrase=None)
    return private, public_key_text(read_public_key(public))


def _pinned_sites(federation: FederationSection, site_names: list[str]) -> dict[str, str]:
    pins = {site.name: site.public_key for site in federation.sites}
    unenrolled = sorted(set(site_names) - set(pins))
    if unenrolled:
        raise KeyFileError(
            f"sites {unenrolled} of the task are not enrolled in [[federation.sites]]"
        )
    assert federation.keys_dir is not None  # enforced by FedsiloConfig for a simulation
    for name in site_names:
        path = federation.keys_dir / f"{name}.key"
        held = public_key_text(read_private_key(path, passphrase=None).public_key())
        if held != pins[name]:
            raise KeyFileError(
                f"{path}: this private key does not belong to the public key pinned for site "
                f"{name!r} in [[federation.sites]]"
            )
    return pins


def enroll_simulated_federation(
    run_dir: Path, *, federation: FederationSection, site_names: list[str]
) -> Membership:
    """Pin the keys of a simulated federation in RUN/federation.json (creating them if needed)."""
    path = Path(run_dir) / "federation.json"
    if path.exists():
        existing = load_membership(path)
        if existing.federation_id != federation.id or not set(site_names) <= set(
            existing.site_public_keys
        ):
            raise ValueError(
                f"{path}: the run was enrolled as federation {existing.federation_id!r} with sites "
                f"{sorted(existing.site_public_keys)}; the config now says {federation.id!r} "
                f"with {sorted(site_names)}"
            )
        return existing
    if federation.coordinator_key is not None:
        coordinator_key = federation.coordinator_key
        coordinator_public = public_key_text(
            read_private_key(coordinator_key, passphrase=None).public_key()
        )
    else:
        coordinator_key, coordinator_public = _key_pair(Path(run_dir) / COORDINATOR, COORDINATOR)
    if federation.sites:
        sites = _pinned_sites(federation, site_names)
    else:
        sites = {name: _key_pair(site_folder(run_dir, name), name)[1] for name in site_names}
    membership = Membership(
        federation_id=federation.id,
        run_id=uuid.uuid4().hex,
        coordinator_key_path=coordinator_key,
        coordinator_public_key=coordinator_public,
        site_public_keys=sites,
    )
    save_membership(membership, path)
    return membership
