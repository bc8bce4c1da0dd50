"""Proof by attack: canary exposure and membership inference after federated training.

    python benchmarks/privacy_attacks.py --model tiny        # CI-sized, a few minutes on 2 cores
    python benchmarks/privacy_attacks.py --model smollm2-135m-instruct --rounds 3 --steps 12

Secret canaries (random MRNs in a clinical-note template) are planted several times in one
site's records; the federation trains with and without record-level DP-SGD (the same task,
rounds and steps); then the final model ranks each planted canary's secret among random
candidates (exposure, Carlini et al. 2019) next to canaries that were never planted, and a
loss-threshold attack tries to tell that site's records from held-out ones (AUC).
Writes benchmarks/results/privacy-attacks-MODEL.json.
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
from typing import Any

import numpy as np
import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.data.icd10 import build_icd10_task
from fedsilo.data.records import ChatRecord
from fedsilo.model.adapters import set_adapter_state
from fedsilo.model.tiny import write_tiny_llama
from fedsilo.privacy.attacks import CANARY_PROMPT, exposure, make_canaries, membership_auc, plant
from fedsilo.server.progress import LogReporter
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, simulate

RESULTS = Path(__file__).parent / "results"


def _write_jsonl(path: Path, records: list[ChatRecord]) -> Path:
    lines = [json.dumps({"prompt": r.prompt, "response": r.response}) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(
    args: argparse.Namespace, work: Path, base: str, privacy: dict[str, Any]
) -> FedsiloConfig:
    task = build_icd10_task(
        num_sites=3,
        partition="by-chapter",
        alpha=1.0,
        examples_per_site=args.examples,
        gold_size=args.examples,
        seed=0,
    )
    rng = np.random.default_rng(0)
    canaries = make_canaries(args.canaries * 2, digits=6, rng=rng)
    planted, held_back = canaries[: args.canaries], canaries[args.canaries :]
    sites = []
    for index, site in enumerate(task.sites):
        records = [r for r in site.records if isinstance(r, ChatRecord)]
        if index == 0:
            records = [
                r
                for r in plant(records, planted, repeats=args.repeats, rng=rng)
                if isinstance(r, ChatRecord)
            ]
        path = _write_jsonl(work / f"{site.name}.jsonl", records)
        sites.append({"name": site.name, "path": str(path)})
    (work / "canaries.json").write_text(
        json.dumps({"planted": [c.secret for c in planted], "never": [c.secret for c in held_back]})
    )
    _write_jsonl(work / "gold.jsonl", list(task.gold))
    return parse_config(
        {
            "run": {"name": "attack", "rounds": args.rounds, "torch_threads": 1},
            "model": {"base": base},
            "task": {
                "name": "files",
                "sites": sites,
                "gold_path": str(work / "gold.jsonl"),
                "system_prompt": task.system_prompt,
            },
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "max_length": 96,
            },
            "strategy": {"min_sites": 3},
            "evaluation": {"max_new_tokens": 4},
            "privacy": privacy,
        },
        source="privacy attack benchmark",
    )


def _attack(
    config: FedsiloConfig, run_dir: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    loaded = load_model_with_adapter(config)
    folder = RunFolder(run_dir)
    adapter = folder.load_checkpoint(folder.latest_checkpoint_round() or 0).adapter
    set_adapter_state(loaded.model, adapter)
    rng = np.random.default_rng(1)
    secrets_by_kind = json.loads((work / "canaries.json").read_text())
    all_canaries = make_canaries(args.canaries * 2, digits=6, rng=np.random.default_rng(0))
    by_secret = {c.secret: c for c in all_canaries}
    system_prompt = config.task.system_prompt

    def exposures(kind: str) -> list[float]:
        return [
            exposure(
                loaded.model,
                loaded.tokenizer,
                by_secret[secret],
                candidates=args.candidates,
                rng=rng,
                system_prompt=system_prompt,
                batch_size=32,
            )
            for secret in secrets_by_kind[kind]
        ]

    site_records = [
        ChatRecord(**json.loads(line))
        for line in Path(config.task.sites[0].path).read_text().splitlines()
        if line.strip()
    ]
    members = [r for r in site_records if r.prompt != CANARY_PROMPT]
    held_out = [
        ChatRecord(**json.loads(line))
        for line in (work / "gold.jsonl").read_text().splitlines()
        if line.strip()
    ]
    planted, never = exposures("planted"), exposures("never")
    auc = membership_auc(
        loaded.model,
        loaded.tokenizer,
        members[: len(held_out)],
        held_out,
        system_prompt=system_prompt,
        batch_size=16,
        max_length=96,
    )
    final = folder.read_metrics()[-1]
    return {
        "planted_exposure": planted,
        "never_inserted_exposure": never,
        "planted_mean": statistics.mean(planted),
        "never_inserted_mean": statistics.mean(never),
        "max_exposure": float(np.log2(args.candidates + 1)),
        "membership_auc": auc,
        "epsilon": final.get("epsilon"),
        "delta": final.get("delta"),
        "gold_loss": final["gold_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--canaries", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = str(write_tiny_llama(work / "tiny")) if args.model == "tiny" else args.model
        settings = {
            "no_dp": {},
            "record_dp": {
                "record_level": True,
                "target_epsilon": args.target_epsilon,
                "max_grad_norm": 1.0,
                "delta": 1e-5,
            },
        }
        for name, privacy in settings.items():
            config = _config(args, work, base, privacy)
            run_dir = work / f"run-{name}"
            started = time.perf_counter()
            simulate(
                SimulationRequest(
                    config=config, run_dir=run_dir, resume=False, reporter=LogReporter()
                )
            )
            results[name] = {
                **_attack(config, run_dir, work, args),
                "seconds": time.perf_counter() - started,
            }
            print(
                name,
                json.dumps(
                    {
                        k: results[name][k]
                        for k in (
                            "planted_mean",
                            "never_inserted_mean",
                            "membership_auc",
                            "epsilon",
                        )
                    }
                ),
            )

    out = RESULTS / f"privacy-attacks-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "privacy-attacks",
        "model": args.model,
        "settings": vars(args),
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
