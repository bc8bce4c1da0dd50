"""Secure aggregation with deployed sites: three site workers (policy files, keys, the tiny
model) answer a real secagg round; only the Runtime API transport is left out."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Context, Message

from fedsilo.client.app import build_client_app
from fedsilo.config import parse_config
from fedsilo.crypto import generate_private_key, init_site_keys, public_key_text, read_public_key
from fedsilo.deploy.site import load_site_policy
from fedsilo.deploy.site_model import DeployedSite, load_identity
from fedsilo.deploy.site_worker import SiteWorker
from fedsilo.ledger import EntryKind, Ledger
from fedsilo.model.adapters import attach_lora, get_adapter_state
from fedsilo.model.base import base_model_hash, load_base_model
from fedsilo.server.federation import collect_round
from fedsilo.server.membership import Membership
from fedsilo.server.rounds import FederationPlan
from fedsilo.server.run_folder import RunFolder
from fedsilo.server.secagg_round import collect_secure_round
from fedsilo.server.strategies import build_strategy
from fedsilo.simulation.inprocess_grid import FIRST_NODE_ID, InProcessGrid

NAMES = ("alpha", "beta", "gamma")
TARGETS = ("q_proj", "v_proj")


def _site_folder(root: Path, name: str, tiny_model_dir: Path, *, with_peers: bool) -> Path:
    folder = root / name
    init_site_keys("coordinator-signing", folder / "keys", passphrase=None)
    (folder / "records.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text(
        '{"prompt": "Fever", "response": "R50.9"}\n{"prompt": "Cough", "response": "R05"}\n'
    )
    connect: dict[str, Any] = {
        "coordinator": "127.0.0.1:9443",
        "ca_cert": "keys/ca.pem",
        "coordinator_key": "keys/coordinator-signing.pub",
    }
    if with_peers:
        connect["peers"] = "../peers"
    policy = {
        "accept": {"federation_id": "pilot"},
        "limits": {"lora_rank": [1, 8]},
        "site": {
            "name": name,
            "data": "records.jsonl",
            "base_model": str(tiny_model_dir),
            "keys_dir": "keys",
        },
        "connect": connect,
    }
    (folder / "policy.toml").write_text(tomli_w.dumps(policy))
    return folder / "policy.toml"


class Workers:
    """The ClientApp stand-in of the grid: each node is one deployed site's worker."""

    def __init__(self, workers: dict[int, SiteWorker]) -> None:
        self.workers = workers

    def __call__(self, message: Message, context: Context) -> Message:
        worker = self.workers[context.node_id]
        return worker._answer(message, context, bundle_sha256="sha256:" + "0" * 64)


def _setup(tmp_path: Path, tiny_model_dir: Path, *, with_peers: bool) -> tuple[Any, ...]:
    """The grid of deployed site workers, a plan for secure rounds, the adapter and the nodes."""
    peers = tmp_path / "peers"
    for name in NAMES:
        init_site_keys(name, peers, passphrase=None)  # the federation's roster: NAME.pub
    paths = [_site_folder(tmp_path, n, tiny_model_dir, with_peers=with_peers) for n in NAMES]
    for name, path in zip(NAMES, paths, strict=True):
        (path.parent / "keys" / f"{name}.key").write_bytes((peers / f"{name}.key").read_bytes())
        (path.parent / "keys" / f"{name}.key").chmod(0o600)
        (peers / f"{name}.key").unlink()
    workers = {}
    for index, path in enumerate(paths):
        policy = load_site_policy(path)
        site = DeployedSite(policy, load_identity(policy))
        workers[FIRST_NODE_ID + index] = SiteWorker(
            site, build_client_app(site), runtime_address="127.0.0.1:1", stop=threading.Event()
        )
    grid = InProcessGrid(Workers(workers), num_nodes=3)  # type: ignore[arg-type]
    config = parse_config(
        {
            "model": {"base": str(tiny_model_dir)},
            "lora": {"rank": 4, "alpha": 8.0, "target_modules": list(TARGETS)},
            "task": {"num_sites": 3},
            "train": {"local_steps": 1, "batch_size": 2, "max_length": 64},
            "federation": {"id": "pilot"},
            "secure_aggregation": {"mode": "secagg"},
        },
        source="test",
    )
    coordinator = generate_private_key()
    membership = Membership(
        "pilot",
        "run-1",
        tmp_path / "c.key",
        public_key_text(coordinator.public_key()),
        {n: public_key_text(read_public_key(peers / f"{n}.pub")) for n in NAMES},
    )
    base, _ = load_base_model(tiny_model_dir)
    model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, init_seed=0)
    template = get_adapter_state(model)
    ledger = Ledger.open(tmp_path / "ledger.db", coordinator_key=coordinator)
    ledger.append(EntryKind.RUN_STARTED, {"test": True})
    plan = FederationPlan(
        config=config,
        folder=RunFolder(tmp_path / "run"),
        base_model_hash=base_model_hash(tiny_model_dir),
        initial_adapter=template,
        strategy=build_strategy(config.strategy),
        evaluate=None,  # type: ignore[arg-type]
        reporter=None,  # type: ignore[arg-type]
        membership=membership,
        ledger=ledger,
        coordinator_key=coordinator,
    )
    return grid, plan, template, [FIRST_NODE_ID + i for i in range(3)]


def test_deployed_sites_complete_a_secagg_round_equal_to_plain_fedavg(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    grid, plan, template, nodes = _setup(tmp_path, tiny_model_dir, with_peers=True)

    secure = collect_secure_round(grid, plan, template, round_number=1, attempt=1, nodes=nodes)
    plain = collect_round(grid, plan, template, round_number=1, attempt=2, nodes=nodes)

    assert secure.contributors == list(NAMES), secure.failures
    assert sorted(plain.updates.sites) == list(NAMES), plain.failures
    # The secure mean weighs sites equally; so does the plain mean when their counts are equal.
    assert len({m.num_examples for m in plain.metrics.values()}) == 1
    aggregate, mean = secure.updates.mean(), plain.updates.mean()
    for name in template:
        torch.testing.assert_close(aggregate[name], mean[name], rtol=0, atol=1e-6)


def test_a_deployed_site_without_the_roster_refuses_naming_the_peer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    grid, plan, template, nodes = _setup(tmp_path, tiny_model_dir, with_peers=False)

    secure = collect_secure_round(grid, plan, template, round_number=1, attempt=1, nodes=nodes)

    assert secure.updates.count == 0
    assert any("is not an enrolled site" in r for r in secure.failures.values()), secure.failures
