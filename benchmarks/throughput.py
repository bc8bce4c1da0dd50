"""Local-training throughput: fedsilo's site loop against a bare torch + peft loop, and DP-SGD.

Both loops train the same LoRA adapter on the same model, the same encoded ICD-10 examples and
the same batches; the bare loop is what one would write by hand (forward, backward, AdamW step).
Repeats alternate between the two so that machine noise hits both alike; the median is reported.

    python benchmarks/throughput.py [--model smollm2-135m-instruct] [--steps 8] [--repeats 3]

Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.client.train import train_local
from fedsilo.config import parse_config
from fedsilo.data.batching import collate, count_tokens, iterate_batches
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.tasks import build_task
from fedsilo.model.adapters import set_adapter_state
from fedsilo.privacy.dp_sgd import train_local_dp

RESULTS = Path(__file__).parent / "results"


def bare_loop(
    model: Any, examples: list[Example], *, steps: int, batch_size: int, lr: float, pad_id: int
) -> int:
    """The hand-written baseline; returns the tokens processed."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokens = 0
    for batch_examples in iterate_batches(
        examples, batch_size=batch_size, steps=steps, generator=np.random.default_rng(0)
    ):
        batch = collate(batch_examples, pad_id=pad_id)
        tokens += count_tokens(batch)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = parse_config(
        {
            "model": {"base": args.model},
            "task": {"num_sites": 4, "examples_per_site": 64},
            "train": {"max_length": 64},
        },
        source="benchmark",
    )
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=0)
    examples = encode_records(
        loaded.tokenizer,
        task.sites[0].records,
        system_prompt=task.system_prompt,
        max_length=config.train.max_length,
        source=task.sites[0].name,
    )
    pad_id = int(loaded.tokenizer.pad_token_id)
    initial = loaded.adapter_template
    lr = config.train.learning_rate

    def run_ours() -> float:
        started = time.perf_counter()
        result = train_local(
            loaded.model,
            examples,
            global_state=initial,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=lr,
            proximal_mu=0.0,
            max_grad_norm=config.train.max_grad_norm,
            pad_id=pad_id,
            seed=0,
        )
        return result.tokens / (time.perf_counter() - started)

    def run_bare() -> float:
        set_adapter_state(loaded.model, initial)
        started = time.perf_counter()
        tokens = bare_loop(
            loaded.model,
            examples,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=lr,
            pad_id=pad_id,
        )
        return tokens / (time.perf_counter() - started)

    def run_dp() -> float:
        started = time.perf_counter()
        result = train_local_dp(
            loaded.model,
            examples,
            global_state=initial,
            steps=args.steps,
            expected_batch_size=args.batch_size,
            learning_rate=lr,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            proximal_mu=0.0,
            pad_id=pad_id,
            seed=0,
        )
        return result.result.tokens / (time.perf_counter() - started)

    run_bare()  # warm-up: first-call allocations and kernel selection
    run_dp()
    ours: list[float] = []
    bare: list[float] = []
    private: list[float] = []
    for _ in range(args.repeats):
        bare.append(run_bare())
        ours.append(run_ours())
        private.append(run_dp())

    result = {
        "benchmark": "local-training-throughput",
        "model": args.model,
        "base_model_hash": loaded.base_model_hash,
        "lora_rank": config.lora.rank,
        "target_modules": list(config.lora.target_modules),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": config.train.max_length,
        "threads": args.threads,
        "repeats": args.repeats,
        "tokens_per_s_fedsilo": ours,
        "tokens_per_s_bare": bare,
        "median_fedsilo": statistics.median(ours),
        "median_bare": statistics.median(bare),
        "ratio": statistics.median(ours) / statistics.median(bare),
        # Record-level DP-SGD (Opacus per-example gradients, clipping, noise), same model and
        # examples, Poisson batches of the same expected size; per token, since batches vary.
        "tokens_per_s_dp_sgd": private,
        "median_dp_sgd": statistics.median(private),
        "dp_sgd_slowdown_per_token": statistics.median(ours) / statistics.median(private),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = ("median_fedsilo", "median_bare", "ratio", "dp_sgd_slowdown_per_token")
    print(json.dumps({key: result[key] for key in summary}))


if __name__ == "__main__":
    main()
