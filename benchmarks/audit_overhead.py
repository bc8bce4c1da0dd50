"""Cost of signing, verifying and ledgering one round, at the demo's adapter or a given size.

    python benchmarks/audit_overhead.py --demo-adapter [--rounds 3]
    python benchmarks/audit_overhead.py [--sites 10] [--params 1000000] [--rounds 3]

``--demo-adapter`` takes the adapter's tensors (names and shapes) and the number of sites from
the demo (src/fedsilo/configs/demo.toml and its base model); otherwise ``--params`` values in
LoRA-shaped tensors (rank 8, width 576). Hashing and signing grow with the bytes, so only the
first compares directly with the demo's round time.

Per round it times what the audit trail adds to a round, with the same functions the
federation uses:
  site side, per update: safetensors encoding, sha256, the Ed25519 signature on the update,
  the one on its policy declaration and the one on its claims (the digest of its metrics and
  DP event);
  coordinator side: round_opened (with the global adapter's digest) and one task_sent entry
  per site, then per update the digest check, the three signature checks and the
  update_received entry (with the declared policy, the metrics and the claims, as
  fedsilo.server.rounds.accept writes it), the round_aggregated entry (with the digests of the
  new adapter and of the server's momentum state) and one signed receipt per site.
Sites work in parallel in a real federation, so the round's audit cost is one site's signing
plus all of the coordinator's work; in a simulation on one machine (the demo) it is every
site's signing plus the coordinator's (both are recorded). benchmarks/report.py compares them
with the demo's round time (results/demo.json) when it writes the page. Writes
results/audit_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedsilo.crypto import (
    PrivateKey,
    Receipt,
    UpdateBinding,
    claims_sha256,
    encode_signature,
    generate_private_key,
    sha256_hex,
    sign_claims,
    sign_policy_declaration,
    sign_receipt,
    sign_update,
    verify_claims,
    verify_policy_declaration,
    verify_update,
)
from fedsilo.ledger import EntryKind, JsonValue, Ledger
from fedsilo.ledger.entries import SITE_CLAIMS_FIELD, SITE_METRICS_FIELD, SITE_POLICY_FIELD
from fedsilo.model.adapters import adapter_to_bytes
from fedsilo.protocol.records import PolicyDeclaration, SignedClaims, SignedPolicy, SiteMetrics
from fedsilo.server.federation import adapter_digest
from fedsilo.server.run_folder import server_state_digest

RESULTS = Path(__file__).parent / "results"


Shapes = dict[str, tuple[int, ...]]
# What a site with a policy declares with each update (its digest and smallest cohort).
POLICY = PolicyDeclaration(policy_sha256="ab" * 32, min_cohort=2)
# The run every update's binding names (the verifier holds each update to it).
RUN_STARTED: dict[str, JsonValue] = {"federation_id": "bench", "run_id": "run"}
DEMO = Path(__file__).parents[1] / "src" / "fedsilo" / "configs" / "demo.toml"


def lora_shapes(params: int) -> Shapes:
    """LoRA-shaped tensors (rank 8, width 576) adding up to ``params`` values."""
    shapes: Shapes = {}
    index = 0
    while sum(math.prod(shape) for shape in shapes.values()) < params:
        shapes[f"layers.{index}.lora_A.weight"] = (8, 576)
        shapes[f"layers.{index}.lora_B.weight"] = (576, 8)
        index += 1
    return shapes


def demo_shapes() -> tuple[Shapes, dict[str, JsonValue], str]:
    """The demo's adapter tensors, what they were built from (base model, LoRA rank and
    targets, number of sites: the page checks them against the measured demo's config), and a
    description of the adapter."""
    from fedsilo.client.site import load_model_with_adapter
    from fedsilo.config import load_config

    config = load_config(DEMO)
    loaded = load_model_with_adapter(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in loaded.adapter_template.items()}
    lora = config.lora
    built_from: dict[str, JsonValue] = {
        "base": config.model.base,
        "rank": lora.rank,
        "target_modules": list(lora.target_modules),
        "sites": config.task.num_sites,
    }
    description = (
        f"the demo's adapter: LoRA rank {lora.rank} on {', '.join(lora.target_modules)} of "
        f"{config.model.base}"
    )
    return shapes, built_from, description


def make_adapter(shapes: Shapes, *, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 tensors of ``shapes`` (the values do not change the cost)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def one_round(
    ledger: Ledger,
    coordinator: PrivateKey,
    sites: list[PrivateKey],
    shapes: Shapes,
    round_number: int,
) -> tuple[list[float], float]:
    """(each site's signing seconds, coordinator seconds) for one round."""
    site_seconds: list[float] = []
    uploads = []
    for index, key in enumerate(sites):
        delta = make_adapter(shapes, seed=round_number * 100 + index)
        started = time.perf_counter()
        payload = adapter_to_bytes(delta)
        binding = UpdateBinding(
            str(RUN_STARTED["federation_id"]),
            str(RUN_STARTED["run_id"]),
            round_number,
            "train",
            f"site-{index}",
            sha256_hex(payload),
        )
        signature = sign_update(key, binding)
        policy = SignedPolicy(
            POLICY,
            sign_policy_declaration(key, binding, POLICY.fields()),
        )
        metrics = SiteMetrics(
            num_examples=64, train_loss=1.25, tokens=4096, seconds=60.0, precision="bf16"
        )
        digest = claims_sha256(metrics=metrics.claim_fields(), dp_event=None)
        claims = SignedClaims(digest, sign_claims(key, binding, digest))
        site_seconds.append(time.perf_counter() - started)
        uploads.append((key, payload, binding, signature, policy, metrics, claims))

    global_state = make_adapter(shapes, seed=-round_number)
    started = time.perf_counter()
    # As fedsilo.server.rounds.open_round: the global adapter's digest opens the round.
    ledger.append(
        EntryKind.ROUND_OPENED,
        {
            "round": round_number,
            "attempt": 1,
            "nodes": list(range(len(sites))),
            "global_adapter_sha256": adapter_digest(global_state),
            "secure_aggregation": "none",
        },
    )
    for index in range(len(sites)):
        ledger.append(
            EntryKind.TASK_SENT,
            {"round": round_number, "attempt": 1, "node": index, "task": {"steps": 4}},
        )
    entries = []
    for node, (key, payload, binding, signature, policy, metrics, claims) in enumerate(uploads):
        # What the coordinator checks and ledgers per upload (fedsilo.server.rounds.accept).
        assert sha256_hex(payload) == binding.payload_sha256
        verify_update(key.public_key(), binding, signature)
        verify_policy_declaration(
            key.public_key(), binding, policy.declaration.fields(), policy.signature
        )
        digest = claims_sha256(metrics=metrics.claim_fields(), dp_event=None)
        verify_claims(key.public_key(), binding, digest, claims.signature)
        fields: dict[str, JsonValue] = {
            **binding.fields(),
            "site_signature": encode_signature(signature),
            "node": node,
            "payload_bytes": len(payload),
            "dp_event": None,
            SITE_POLICY_FIELD: dict(policy.ledger_fields()),
            SITE_METRICS_FIELD: dict(metrics.claim_fields()),
            SITE_CLAIMS_FIELD: dict(claims.ledger_fields()),
            "num_examples": metrics.num_examples,
        }
        entries.append((binding, ledger.append(EntryKind.UPDATE_RECEIVED, fields)))
    # As fedsilo.server.federation: the new adapter's digest and that of the server's state
    # (FedAvg's momentum, as in the demo: one velocity tensor per adapter tensor).
    new_global = make_adapter(shapes, seed=-1 - round_number)
    velocity = {f"velocity.{name}": tensor for name, tensor in global_state.items()}
    ledger.append(
        EntryKind.ROUND_AGGREGATED,
        {
            "round": round_number,
            "adapter_sha256": adapter_digest(new_global),
            "server_state_sha256": server_state_digest(velocity),
        },
    )
    for binding, entry in entries:
        sign_receipt(coordinator, Receipt(binding, entry.seq, entry.entry_hash))
    return site_seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--demo-adapter", action="store_true", help="the demo's adapter tensors and sites"
    )
    parser.add_argument("--sites", type=int, default=None, help="default 10 (demo: its sites)")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "audit_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    built_from: dict[str, JsonValue] | None = None
    if args.demo_adapter:
        shapes, built_from, adapter = demo_shapes()
        args.sites = args.sites or built_from["sites"]
        built_from["sites"] = args.sites
    else:
        shapes, adapter = lora_shapes(args.params), "LoRA-shaped tensors of rank 8 and width 576"
        args.sites = args.sites or 10

    coordinator = generate_private_key()
    sites = [generate_private_key() for _ in range(args.sites)]
    site_times: list[list[float]] = []
    coordinator_times: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Ledger.open(Path(tmp) / "ledger.db", coordinator_key=coordinator) as ledger,
    ):
        ledger.append(EntryKind.RUN_STARTED, RUN_STARTED)
        for round_number in range(1, args.rounds + 1):
            site_s, coordinator_s = one_round(ledger, coordinator, sites, shapes, round_number)
            site_times.append(site_s)
            coordinator_times.append(coordinator_s)
        head = ledger.head()
        assert head is not None
        entries_per_round = (head.seq - 1) // args.rounds

    rounds = list(zip(site_times, coordinator_times, strict=True))
    result: dict[str, object] = {
        "benchmark": "audit-overhead-per-round",
        "command": " ".join(["python", "benchmarks/audit_overhead.py", *sys.argv[1:]]),
        "sites": args.sites,
        "adapter": "demo" if args.demo_adapter else "lora-shaped",
        "adapter_built_from": built_from,
        "adapter_description": adapter,
        "params_per_adapter": sum(math.prod(shape) for shape in shapes.values()),
        "payload_bytes": len(adapter_to_bytes(make_adapter(shapes, seed=0))),
        "rounds": args.rounds,
        "ledger_entries_per_round": entries_per_round,
        "slowest_site_signing_s": [max(sites_s) for sites_s in site_times],
        "all_sites_signing_s": [sum(sites_s) for sites_s in site_times],
        "coordinator_s": coordinator_times,
        # Sites on their own machines sign in parallel: the slowest one, then the coordinator.
        "median_audit_s_per_round": statistics.median(max(s) + c for s, c in rounds),
        # Every site on one machine, as in a simulation such as the demo: all of them in turn.
        "median_audit_s_per_round_one_machine": statistics.median(sum(s) + c for s, c in rounds),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: result[k] for k in ("median_audit_s_per_round", "ledger_entries_per_round")})
    )


if __name__ == "__main__":
    main()
