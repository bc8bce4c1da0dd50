"""Cost of signing, verifying and ledgering one round: 10 sites with 1M-parameter adapters.

    python benchmarks/audit_overhead.py [--sites 10] [--params 1000000] [--rounds 3]

Per round it times what the audit trail adds to a round, with the same functions the
federation uses:
  site side, per update: safetensors encoding, sha256, the Ed25519 signature on the update
  and the second one on its claims (the digest of its metrics and DP event);
  coordinator side: round_opened and one task_sent entry per site, then per update the digest
  check, both signature checks and the update_received entry, the round_aggregated entry (with
  the new adapter's digest) and one signed receipt per site.
Sites work in parallel in a real federation, so the round's audit cost is one site's signing
plus all of the coordinator's work. benchmarks/report.py compares it with the demo's round time
(results/demo.json) when it writes the page. Writes results/audit_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    sign_receipt,
    sign_update,
    verify_claims,
    verify_update,
)
from fedsilo.ledger import EntryKind, JsonValue, Ledger
from fedsilo.model.adapters import adapter_to_bytes
from fedsilo.server.federation import adapter_digest

RESULTS = Path(__file__).parent / "results"


def make_adapter(params: int, *, seed: int) -> dict[str, torch.Tensor]:
    """LoRA-shaped fp32 tensors (rank 8, width 576) adding up to ``params`` values."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    index = 0
    while sum(t.numel() for t in tensors.values()) < params:
        tensors[f"layers.{index}.lora_A.weight"] = torch.randn(8, 576, generator=generator)
        tensors[f"layers.{index}.lora_B.weight"] = torch.randn(576, 8, generator=generator)
        index += 1
    return tensors


def one_round(
    ledger: Ledger,
    coordinator: PrivateKey,
    sites: list[PrivateKey],
    params: int,
    round_number: int,
) -> tuple[float, float]:
    """(slowest site's signing seconds, coordinator seconds) for one round."""
    site_seconds: list[float] = []
    uploads = []
    for index, key in enumerate(sites):
        delta = make_adapter(params, seed=round_number * 100 + index)
        started = time.perf_counter()
        payload = adapter_to_bytes(delta)
        binding = UpdateBinding(
            "bench", "run", round_number, "train", f"site-{index}", sha256_hex(payload)
        )
        signature = sign_update(key, binding)
        metrics: dict[str, JsonValue] = {
            "num_examples": 64,
            "train_loss": 1.25,
            "tokens": 4096,
            "seconds": 60.0,
        }
        digest = claims_sha256(metrics=metrics, dp_event=None)
        claims_signature = sign_claims(key, binding, digest)
        site_seconds.append(time.perf_counter() - started)
        uploads.append((key, payload, binding, signature, metrics, claims_signature))

    started = time.perf_counter()
    ledger.append(EntryKind.ROUND_OPENED, {"round": round_number, "nodes": list(range(len(sites)))})
    for index in range(len(sites)):
        ledger.append(EntryKind.TASK_SENT, {"round": round_number, "node": index})
    entries = []
    for key, payload, binding, signature, metrics, claims_signature in uploads:
        assert sha256_hex(payload) == binding.payload_sha256
        verify_update(key.public_key(), binding, signature)
        digest = claims_sha256(metrics=metrics, dp_event=None)
        verify_claims(key.public_key(), binding, digest, claims_signature)
        entry = ledger.append(
            EntryKind.UPDATE_RECEIVED,
            {
                **binding.fields(),
                "site_signature": encode_signature(signature),
                "payload_bytes": len(payload),
                "site_metrics": metrics,
                "dp_event": None,
                "site_claims": {
                    "claims_sha256": digest,
                    "signature": encode_signature(claims_signature),
                },
            },
        )
        entries.append((binding, entry))
    new_global = make_adapter(params, seed=-1 - round_number)
    ledger.append(
        EntryKind.ROUND_AGGREGATED,
        {"round": round_number, "adapter_sha256": adapter_digest(new_global)},
    )
    for binding, entry in entries:
        sign_receipt(coordinator, Receipt(binding, entry.seq, entry.entry_hash))
    return max(site_seconds), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "audit_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    coordinator = generate_private_key()
    sites = [generate_private_key() for _ in range(args.sites)]
    site_times: list[float] = []
    coordinator_times: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Ledger.open(Path(tmp) / "ledger.db", coordinator_key=coordinator) as ledger,
    ):
        ledger.append(EntryKind.RUN_STARTED, {"run_id": "bench"})
        for round_number in range(1, args.rounds + 1):
            site_s, coordinator_s = one_round(ledger, coordinator, sites, args.params, round_number)
            site_times.append(site_s)
            coordinator_times.append(coordinator_s)
        head = ledger.head()
        assert head is not None
        entries_per_round = (head.seq - 1) // args.rounds

    per_round = statistics.median(s + c for s, c in zip(site_times, coordinator_times, strict=True))
    result: dict[str, object] = {
        "benchmark": "audit-overhead-per-round",
        "sites": args.sites,
        "params_per_adapter": args.params,
        "payload_bytes": len(adapter_to_bytes(make_adapter(args.params, seed=0))),
        "rounds": args.rounds,
        "ledger_entries_per_round": entries_per_round,
        "slowest_site_signing_s": site_times,
        "coordinator_s": coordinator_times,
        "median_audit_s_per_round": per_round,
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
