"""A secure-aggregation round over the in-process grid with fixed site inputs (no training).

The real ServerApp-side stages and the real ClientApp handlers run message for message; only
local training is replaced by a fixed delta per site, so sums can be checked to the bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

from fedsilo.client import local as client_local
from fedsilo.client.app import build_client_app
from fedsilo.client.policy import SitePolicy
from fedsilo.client.site import Site
from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.crypto import PrivateKey, generate_private_key, public_key_text
from fedsilo.ledger import EntryKind, Ledger, read_entries
from fedsilo.model.adapters import AdapterState
from fedsilo.model.flatten import flatten
from fedsilo.privacy.secagg.quantize import quantize, ring_sum
from fedsilo.protocol.records import RoundTask, SiteMetrics
from fedsilo.server.membership import Membership
from fedsilo.server.rounds import FederationPlan, RoundReplies
from fedsilo.server.run_folder import RunFolder
from fedsilo.server.secagg_round import SecAggState, secure_sum
from fedsilo.server.strategies import build_strategy
from fedsilo.simulation.inprocess_grid import FIRST_NODE_ID, InProcessGrid

TEMPLATE: AdapterState = {"a.lora_A": torch.zeros(3, 5), "a.lora_B": torch.zeros(4, 3)}


class StageGrid(InProcessGrid):
    """An in-process grid where chosen nodes stop answering from a chosen message type on,
    and that keeps a copy of every reply the server receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_from: dict[str, set[int]] = {}
        self.received: list[Message] = []
        self.tamper: Callable[[Message], None] | None = None
        self._gone: set[int] = set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            self._gone |= self.drop_from.get(message.metadata.message_type, set())
            if self.tamper is not None:
                self.tamper(message)
        self.set_unreachable(self._gone)
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        self.received.extend(copy.deepcopy(replies))
        return replies


@dataclass
class FixedSites:
    """Sites with identity keys and fixed deltas; ``policies`` by site name."""

    sites: list[Site]
    deltas: dict[str, AdapterState]

    def site_for(self, context: Context) -> Site:
        return self.sites[int(context.node_config["partition-id"])]


@dataclass
class Harness:
    config: FedsiloConfig
    plan: FederationPlan
    grid: StageGrid
    sites: FixedSites
    names: list[str]
    nodes: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    def node(self, name: str) -> int:
        return self.nodes[self.names.index(name)]

    def run(self, *, round_number: int = 1, attempt: int = 1) -> tuple[SecAggState, RoundReplies]:
        return secure_sum(
            self.grid,
            self.plan,
            TEMPLATE,
            round_number=round_number,
            attempt=attempt,
            nodes=self.nodes,
        )

    def expected_sum(self, names: Iterable[str]) -> np.ndarray:
        q = secagg_quantization(self)
        return ring_sum([quantize(flatten(self.sites.deltas[n]), q) for n in sorted(names)])


# Distributed DP with L2 clip 0.1 and little noise: three honest inputs, each clipped, sum to
# an L2 norm of about 0.3 plus the noise's (the bound is about 0.51); one input of 0.4 per
# coordinate, unclipped, has norm 2.08.
SITE_DP_SMALL_NOISE = {"site_level": True, "site_clip_norm": 0.1, "site_noise_multiplier": 0.1}


def noise_floor_policy(floor: float) -> SitePolicy:
    """A site policy for federation "fed" with ``[privacy] min_distributed_noise_multiplier``."""
    return SitePolicy.model_validate(
        {"accept": {"federation_id": "fed"}, "privacy": {"min_distributed_noise_multiplier": floor}}
    )


def deltas_with_one_large(h: Harness) -> None:
    """Small updates at every site but site-0, whose update clipping must shrink."""
    for name in h.names:
        h.sites.deltas[name] = {n: t * 0.1 for n, t in h.sites.deltas[name].items()}
    h.sites.deltas["site-0"] = {n: t * 0 + 0.4 for n, t in h.sites.deltas["site-0"].items()}


def halted_at(h: Harness, stage: str) -> dict[str, Any]:
    """The ledgered payload of the one attempt that halted at ``stage``."""
    [halted] = [
        e.payload
        for e in read_entries(h.plan.ledger.path)
        if e.payload.get("outcome") == "halted" and e.payload.get("stage") == stage
    ]
    return dict(halted)


def secagg_quantization(h: Harness) -> Any:
    from fedsilo.server.secagg_round import secagg_params

    return secagg_params(h.plan, len(h.nodes)).quantization()


def _delta(index: int) -> AdapterState:
    generator = torch.Generator().manual_seed(index)
    return {
        name: (torch.rand(t.shape, generator=generator) - 0.5) * 0.2 for name, t in TEMPLATE.items()
    }


def make_harness(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    num_sites: int,
    threshold: int | None = None,
    min_sites: int = 2,
    policies: dict[str, SitePolicy] | None = None,
    privacy: dict[str, Any] | None = None,
    secure: dict[str, Any] | None = None,
) -> Harness:
    config = parse_config(
        {
            "task": {"num_sites": num_sites},
            "strategy": {"min_sites": min_sites},
            "secure_aggregation": {
                "mode": "secagg",
                "threshold": threshold,
                "clip": 0.5,
                **(secure or {}),
            },
            "privacy": privacy or {},
        },
        source="test config",
    )
    names = [f"site-{i}" for i in range(num_sites)]
    keys: dict[str, PrivateKey] = {name: generate_private_key() for name in names}
    coordinator = generate_private_key()
    membership = Membership(
        federation_id="fed",
        run_id="run-1",
        coordinator_key_path=tmp_path / "coordinator.key",
        coordinator_public_key=public_key_text(coordinator.public_key()),
        site_public_keys={n: public_key_text(k.public_key()) for n, k in keys.items()},
    )
    sites = [
        Site(
            name=name,
            model=None,  # type: ignore[arg-type]
            tokenizer=None,  # type: ignore[arg-type]
            examples=(),
            base_model_hash="sha256:" + "0" * 64,
            adapter_template=TEMPLATE,
            signing_key=keys[name],
            coordinator_key=coordinator.public_key(),
            receipts_dir=tmp_path / name / "receipts",
            spent_path=tmp_path / name / "spent.json",
            policy=(policies or {}).get(name),
            sessions_path=tmp_path / name / "secure-sessions.json",
            peer_keys=membership.site_keys(),
        )
        for name in names
    ]
    fixed = FixedSites(sites, {name: _delta(i) for i, name in enumerate(names)})

    def fixed_training(
        site: Site, task: RoundTask, global_state: AdapterState
    ) -> tuple[AdapterState, SiteMetrics]:
        # The site's real checks (policy, task, global adapter) run around it.
        return fixed.deltas[site.name], SiteMetrics.withheld()

    monkeypatch.setattr(client_local, "_train", fixed_training)
    ledger = Ledger.open(tmp_path / "ledger.sqlite", coordinator_key=coordinator)
    ledger.append(EntryKind.RUN_STARTED, {"federation_id": "fed", "run_id": "run-1"})
    plan = FederationPlan(
        config=config,
        folder=RunFolder(tmp_path / "run"),
        base_model_hash="sha256:" + "0" * 64,
        initial_adapter=TEMPLATE,
        strategy=build_strategy(config.strategy),
        evaluate=lambda adapter: None,  # type: ignore[arg-type, return-value]
        reporter=None,  # type: ignore[arg-type]
        membership=membership,
        ledger=ledger,
        coordinator_key=coordinator,
    )
    grid = StageGrid(build_client_app(fixed), num_nodes=num_sites)
    nodes = [FIRST_NODE_ID + i for i in range(num_sites)]
    return Harness(config, plan, grid, fixed, names, nodes)
