"""Clustered federations: one federation, and one expert adapter, per group of sites.

RUN/ of a clustered run holds the index and every cluster's complete run::

    RUN/config.toml, federation.json, status.json   the clustered run's config and identities
    RUN/ledger.db          index ledger: run_started, clusters_assigned, expert_finished per
                           cluster (its run id, ledger head hash, adapter digests), run_finished
    RUN/keys/, coordinator/  each site's key pair (one per site, shared by the clusters it is in)
                           and the coordinator's, which signs every ledger of the run
    RUN/probe/NAME.safetensors  method "update-cosine": each site's first-round update
    RUN/clusters/NAME/     the cluster's federation: a normal run folder with its own ledger
    RUN/experts/NAME/      its final adapter, PEFT format, plus expert.json

``fedsilo audit verify RUN`` checks the index ledger, every cluster's run, and that the files
on disk are the ones the ledgers name (fedsilo.server.lineage).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fedsilo
from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import (
    ClustersSection,
    ConfigError,
    FedsiloConfig,
    config_digest,
    parse_config,
    save_config,
)
from fedsilo.crypto import (
    fingerprint,
    init_site_keys,
    public_key_text,
    read_private_key,
    read_public_key,
    sha256_hex,
)
from fedsilo.data.encode import encode_records
from fedsilo.data.tasks import build_task
from fedsilo.ledger import EntryKind, JsonValue, Ledger, read_entries
from fedsilo.model.adapters import AdapterState, adapter_from_bytes, save_adapter
from fedsilo.model.base import base_model_hash, resolve_base_model
from fedsilo.protocol.schedule import local_steps_for, round_learning_rate
from fedsilo.server.clustering import agglomerate, cluster_names, cosine_similarities
from fedsilo.server.federation import ProgressReporter, adapter_digest
from fedsilo.server.membership import Membership, save_membership
from fedsilo.server.run_folder import RunFolder
from fedsilo.storage import atomic_folder, write_text_atomic
from fedsilo.training.loop import train_plain

COORDINATOR = "coordinator"
EXPERT_INFO = "expert.json"
PEFT_WEIGHTS = "adapter_model.safetensors"

ClusterRunner = Callable[[FedsiloConfig, Path], None]
"""Runs one cluster's federation (its config, its run folder) to completion."""


@dataclass(frozen=True)
class ClusteredPaths:
    """Where the parts of a clustered run live."""

    root: Path

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def coordinator_key(self) -> Path:
        return self.root / COORDINATOR / f"{COORDINATOR}.key"

    @property
    def probe_dir(self) -> Path:
        return self.root / "probe"

    @property
    def experts_dir(self) -> Path:
        return self.root / "experts"

    def cluster_run(self, name: str) -> Path:
        return self.root / "clusters" / name

    def expert(self, name: str) -> Path:
        return self.experts_dir / name


def file_sha256(path: Path) -> str:
    """Lowercase hex sha256 of a file's bytes."""
    return sha256_hex(Path(path).read_bytes())


def _key_text(folder: Path, name: str) -> str:
    if not (folder / f"{name}.key").exists():
        folder.mkdir(parents=True, exist_ok=True)
        init_site_keys(name, folder, passphrase=None)
    return public_key_text(read_public_key(folder / f"{name}.pub"))


def _site_pins(
    config: FedsiloConfig, paths: ClusteredPaths, sites: Sequence[str]
) -> tuple[dict[str, str], Path]:
    """Each site's public key and the folder with its private key (created once per site)."""
    federation = config.federation
    if federation.sites:
        assert federation.keys_dir is not None  # enforced by FederationSection
        pins = {site.name: site.public_key for site in federation.sites}
        missing = sorted(set(sites) - set(pins))
        if missing:
            raise ConfigError(f"sites {missing} are not enrolled in [[federation.sites]]")
        return {name: pins[name] for name in sites}, federation.keys_dir
    return {name: _key_text(paths.keys_dir, name) for name in sites}, paths.keys_dir


def assign_clusters(
    clusters: ClustersSection, sites: Sequence[str], probe: Mapping[str, AdapterState] | None
) -> tuple[dict[str, list[str]], dict[str, dict[str, float]] | None]:
    """Cluster name -> its sites (in task order), and the similarities used (update-cosine)."""
    order = {name: index for index, name in enumerate(sites)}
    if clusters.method == "groups":
        listed = {site for members in clusters.groups.values() for site in members}
        unknown, missing = sorted(listed - set(sites)), sorted(set(sites) - listed)
        if unknown or missing:
            raise ConfigError(
                f"[clusters.groups] must place every site of the task in one cluster: "
                f"unknown {unknown}, not placed {missing} (the task's sites: {list(sites)})"
            )
        named = {
            name: sorted(members, key=order.__getitem__)
            for name, members in clusters.groups.items()
        }
        return named, None
    if clusters.method == "site":
        return {name: [name] for name in sites}, None
    if clusters.method == "update-cosine":
        assert probe is not None
        similarity = cosine_similarities(probe)
        if clusters.count > len(sites):
            raise ConfigError(f"clusters.count={clusters.count} exceeds the {len(sites)} sites")
        named = cluster_names(agglomerate(similarity, count=clusters.count))
        return {
            name: sorted(members, key=order.__getitem__) for name, members in named.items()
        }, similarity
    raise ConfigError(f"clusters.method {clusters.method!r} does not form clusters")


def probe_updates(config: FedsiloConfig, paths: ClusteredPaths) -> dict[str, AdapterState]:
    """Each site's first-round update from the initial adapter, saved to RUN/probe/NAME.

    In simulation this process stands in for every site: the update is exactly what the site
    would send in round 1 (same steps, batch size, learning rate and seeded batches).
    """
    if config.privacy.record_level or config.privacy.site_level:
        raise ConfigError(
            'clusters.method "update-cosine" compares every site\'s raw first update, which '
            "differential privacy forbids the coordinator to see; use groups or site"
        )
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=config.run.seed)
    updates: dict[str, AdapterState] = {}
    for index, site in enumerate(task.sites):
        examples = encode_records(
            loaded.tokenizer,
            site.records,
            system_prompt=task.system_prompt,
            max_length=config.train.max_length,
            source=f"site {site.name}",
        )
        seed = int(np.random.SeedSequence([config.run.seed, 1, index]).generate_state(1)[0])
        result = train_plain(
            loaded.model,
            examples,
            global_state=loaded.adapter_template,
            steps=local_steps_for(
                local_steps=config.train.local_steps or 0,
                local_epochs=config.train.local_epochs or 0.0,
                batch_size=config.train.batch_size,
                num_examples=len(examples),
            ),
            batch_size=config.train.batch_size,
            learning_rate=round_learning_rate(
                config.train.learning_rate,
                round_number=1,
                rounds=config.run.rounds,
                schedule=config.train.lr_schedule,
                warmup_rounds=config.train.warmup_rounds,
            ),
            proximal_mu=0.0,
            max_grad_norm=config.train.max_grad_norm,
            pad_id=int(loaded.tokenizer.pad_token_id),
            seed=seed,
        )
        save_adapter(result.delta, paths.probe_dir / f"{site.name}.safetensors")
        updates[site.name] = result.delta
    return updates


def cluster_config(
    config: FedsiloConfig,
    sites: Sequence[str],
    *,
    pins: Mapping[str, str],
    keys_dir: Path,
    coordinator_key: Path,
    source: str,
) -> FedsiloConfig:
    """The config of one cluster's federation: only its sites, the run's keys, no clusters.

    ``min_sites`` and ``sites_per_round`` are capped at the cluster's size.
    """
    data: dict[str, Any] = config.model_dump(mode="python", exclude_none=True)
    data.pop("clusters", None)
    data["task"]["only_sites"] = list(sites)
    data["federation"].update(
        sites=[{"name": name, "public_key": pins[name]} for name in sites],
        keys_dir=keys_dir,
        coordinator_key=coordinator_key,
    )
    strategy = data["strategy"]
    strategy["min_sites"] = min(strategy["min_sites"], len(sites))
    if "sites_per_round" in strategy:
        strategy["sites_per_round"] = min(strategy["sites_per_round"], len(sites))
    return parse_config(data, source=source)


def _json(value: object) -> JsonValue:
    return json.loads(json.dumps(value))  # type: ignore[no-any-return]


def write_expert(run_dir: Path, out: Path, *, name: str, sites: Sequence[str]) -> dict[str, Any]:
    """Copy a finished cluster run's final adapter to ``out`` with its expert.json."""
    folder = RunFolder(run_dir)
    info = folder.read_json(folder.run_info_path)
    expert = {
        "name": name,
        "sites": list(sites),
        "system_prompt": info.get("system_prompt"),
        "base_model_hash": info["base_model_hash"],
        "run": str(Path(run_dir).resolve()),
    }
    with atomic_folder(out) as tmp:
        for item in sorted(folder.final_dir.iterdir()):
            shutil.copy2(item, tmp / item.name)
        write_text_atomic(tmp / EXPERT_INFO, json.dumps(expert, indent=2, sort_keys=True) + "\n")
    return expert


def simulate_clustered(
    config: FedsiloConfig,
    *,
    run_dir: Path,
    reporter: ProgressReporter,
    run_cluster: ClusterRunner,
) -> dict[str, list[str]]:
    """Run one federation per cluster of ``config``; returns the clusters (name -> sites).

    ``run_cluster(cluster_config, folder)`` runs one cluster's federation to completion
    (the simulation engine). Every step is ledgered in RUN/ledger.db before the next begins.
    """
    paths = ClusteredPaths(Path(run_dir))
    folder = RunFolder(paths.root)
    if folder.ledger_path.exists():
        raise FileExistsError(f"{folder.root} already holds a run; choose another --out")
    folder.root.mkdir(parents=True, exist_ok=True)
    save_config(config, folder.config_path)
    folder.write_json(folder.status_path, {"status": "running"})
    try:
        clusters = _simulate(config, paths, reporter, run_cluster)
    except BaseException as error:
        folder.write_json(
            folder.status_path, {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        )
        raise
    folder.write_json(folder.status_path, {"status": "completed", "clusters": clusters})
    return clusters


def _simulate(
    config: FedsiloConfig,
    paths: ClusteredPaths,
    reporter: ProgressReporter,
    run_cluster: ClusterRunner,
) -> dict[str, list[str]]:
    folder = RunFolder(paths.root)
    sites = [site.name for site in build_task(config.task, seed=config.run.seed).sites]
    coordinator_key_path = config.federation.coordinator_key
    if coordinator_key_path is None:
        _key_text(paths.coordinator_key.parent, COORDINATOR)
        coordinator_key_path = paths.coordinator_key
    coordinator_key = read_private_key(coordinator_key_path, passphrase=None)
    pins, keys_dir = _site_pins(config, paths, sites)
    membership = Membership(
        federation_id=config.federation.id,
        run_id=uuid.uuid4().hex,
        coordinator_key_path=coordinator_key_path,
        coordinator_public_key=public_key_text(coordinator_key.public_key()),
        site_public_keys=pins,
    )
    save_membership(membership, folder.membership_path)
    base_hash = base_model_hash(resolve_base_model(config.model.base))
    with Ledger.open(folder.ledger_path, coordinator_key=coordinator_key) as ledger:
        ledger.append(
            EntryKind.RUN_STARTED,
            {
                "federation_id": membership.federation_id,
                "run_id": membership.run_id,
                "run_name": config.run.name,
                "kind": "clustered",
                "config_digest": config_digest(config),
                "base_model_hash": base_hash,
                "coordinator_fingerprint": fingerprint(coordinator_key.public_key()),
                "sites": dict(membership.fingerprints()),
                "fedsilo_version": fedsilo.__version__,
            },
        )
        probe = None
        if config.clusters.method == "update-cosine":
            reporter.notice("clustering: each site's first-round update, compared by cosine")
            probe = probe_updates(config, paths)
        clusters, similarity = assign_clusters(config.clusters, sites, probe)
        ledger.append(
            EntryKind.CLUSTERS_ASSIGNED,
            {
                "method": config.clusters.method,
                "count": len(clusters),
                "clusters": _json(clusters),
                "similarity": _json(similarity),
                "probe_sha256": (
                    None
                    if probe is None
                    else {
                        name: file_sha256(paths.probe_dir / f"{name}.safetensors")
                        for name in sorted(probe)
                    }
                ),
            },
        )
        experts: dict[str, JsonValue] = {}
        for name, members in clusters.items():
            reporter.notice(f"cluster {name}: federation of {', '.join(members)}")
            sub_config = cluster_config(
                config,
                members,
                pins=pins,
                keys_dir=keys_dir,
                coordinator_key=coordinator_key_path,
                source=f"{folder.config_path} (cluster {name})",
            )
            sub_dir = paths.cluster_run(name)
            run_cluster(sub_config, sub_dir)
            expert_dir = paths.expert(name)
            write_expert(sub_dir, expert_dir, name=name, sites=members)
            entries = read_entries(RunFolder(sub_dir).ledger_path)
            peft_sha = file_sha256(expert_dir / PEFT_WEIGHTS)
            sub_membership = json.loads(RunFolder(sub_dir).membership_path.read_text("utf-8"))
            ledger.append(
                EntryKind.EXPERT_FINISHED,
                {
                    "cluster": name,
                    "sites": list(members),
                    "run_folder": f"clusters/{name}",
                    "expert_folder": f"experts/{name}",
                    "run_id": str(sub_membership["run_id"]),
                    "config_digest": config_digest(sub_config),
                    "ledger_entries": len(entries),
                    "ledger_head_hash": entries[-1].entry_hash,
                    "adapter_sha256": adapter_digest(
                        adapter_from_bytes((expert_dir / PEFT_WEIGHTS).read_bytes())
                    ),
                    "peft_sha256": peft_sha,
                    "expert_info_sha256": file_sha256(expert_dir / EXPERT_INFO),
                },
            )
            experts[name] = peft_sha
        ledger.append(EntryKind.RUN_FINISHED, {"clusters": len(clusters), "experts": experts})
    return clusters
