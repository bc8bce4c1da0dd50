"""Key enrollment for a simulated federation: every site and the coordinator get a key pair.

In a real deployment each site creates its key (`fedsilo keys init`) and the coordinator pins
the public key. In simulation the run folder stands in for every machine: site keys live in
RUN/sites/NAME/ (the site's own storage, where its receipts go too) and the coordinator's in
RUN/coordinator/. Keys are created once and reused when the run resumes.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from fedsilo.crypto import init_site_keys, public_key_text, read_public_key
from fedsilo.server.membership import Membership, load_membership, save_membership

COORDINATOR = "coordinator"


def site_folder(run_dir: Path, site: str) -> Path:
    """A simulated site's own storage: its key pair and its receipts."""
    return Path(run_dir) / "sites" / site


def _key_pair(folder: Path, name: str) -> tuple[Path, str]:
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if not private.exists():
        folder.mkdir(parents=True, exist_ok=True)
        private, public = init_site_keys(name, folder, passphrase=None)
    return private, public_key_text(read_public_key(public))


def enroll_simulated_federation(
    run_dir: Path, *, federation_id: str, site_names: list[str]
) -> Membership:
    """Create (or reuse) the keys of a simulated federation and pin them in RUN/federation.json."""
    path = Path(run_dir) / "federation.json"
    if path.exists():
        existing = load_membership(path)
        if existing.federation_id != federation_id or set(existing.site_public_keys) != set(
            site_names
        ):
            raise ValueError(
                f"{path}: the run was enrolled as federation {existing.federation_id!r} with sites "
                f"{sorted(existing.site_public_keys)}; the config now says {federation_id!r} "
                f"with {sorted(site_names)}"
            )
        return existing
    coordinator_key, coordinator_public = _key_pair(Path(run_dir) / COORDINATOR, COORDINATOR)
    sites = {name: _key_pair(site_folder(run_dir, name), name)[1] for name in site_names}
    membership = Membership(
        federation_id=federation_id,
        run_id=uuid.uuid4().hex,
        coordinator_key_path=coordinator_key,
        coordinator_public_key=coordinator_public,
        site_public_keys=sites,
    )
    save_membership(membership, path)
    return membership
