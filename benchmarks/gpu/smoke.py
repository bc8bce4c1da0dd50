"""A short check that training, DP-SGD and gold evaluation run on a device, on a tiny model.

    python benchmarks/gpu/smoke.py --device cuda --out DIR

Writes a tiny random-init Llama, loads it with train.device, takes a few plain and DP-SGD
steps and scores the gold set; fails (exit 1) on a non-finite loss, a model or batch left on
the wrong device, or adapter state that is not CPU fp32. Prints timings per step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import parse_config
from fedsilo.data.encode import encode_records
from fedsilo.data.tasks import build_task
from fedsilo.evaluation.gold import evaluate_task_gold
from fedsilo.model.tiny import write_tiny_llama
from fedsilo.privacy.dp_sgd import train_local_dp
from fedsilo.training.device import model_device
from fedsilo.training.loop import train_plain
from fedsilo.training.precision import compute_in


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--shape",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="smollm2: random weights in SmolLM2-135M's decoder shape (576 wide, 30 layers, "
        "MLP 1536; byte vocabulary), to time steps as the real model takes them",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--gold-size", type=int, default=32)
    parser.add_argument("--tag", default="", help="added to the report's file name")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / f"{args.shape}-llama"
    shape = {"hidden_size": 128, "num_layers": 4, "intermediate_size": 256}
    if args.shape == "smollm2":
        shape = {"hidden_size": 576, "num_layers": 30, "num_heads": 9, "intermediate_size": 1536}
    if not folder.exists():
        write_tiny_llama(folder, **shape)
    config = parse_config(
        {
            "run": {"name": "smoke", "seed": 0, "rounds": 1, "require_site_policies": False},
            "model": {"base": str(folder)},
            "lora": {"rank": 8, "alpha": 16.0},
            "task": {
                "name": "icd10",
                "num_sites": 2,
                "examples_per_site": 64,
                "gold_size": args.gold_size,
                "gold_phrasings": args.gold_size,
                "gold_ranking_candidates": 10,
            },
            "train": {"local_steps": 4, "batch_size": 16, "device": args.device},
        },
        source="smoke",
    )
    started = time.perf_counter()
    loaded = load_model_with_adapter(config)
    device = model_device(loaded.model)
    report: dict[str, object] = {
        "device": str(device),
        "precision": loaded.precision.as_record(),
        "load_seconds": time.perf_counter() - started,
    }
    problems = []
    if device.type != args.device:
        problems.append(f"model on {device}, asked for {args.device}")
    task = build_task(config.task, seed=0)
    examples = encode_records(
        loaded.tokenizer,
        task.sites[0].records,
        system_prompt=task.system_prompt,
        max_length=96,
        source="smoke",
    )
    pad_id = int(loaded.tokenizer.pad_token_id)
    loops: tuple[tuple[str, Callable[[int], float]], ...] = (
        (
            "plain",
            lambda steps: (
                train_plain(
                    loaded.model,
                    examples,
                    global_state=loaded.adapter_template,
                    steps=steps,
                    batch_size=16,
                    learning_rate=0.01,
                    proximal_mu=0.01,
                    max_grad_norm=1.0,
                    pad_id=pad_id,
                    seed=1,
                ).train_loss
            ),
        ),
        (
            "dp-sgd",
            lambda steps: (
                train_local_dp(
                    loaded.model,
                    examples,
                    global_state=loaded.adapter_template,
                    steps=steps,
                    expected_batch_size=16,
                    learning_rate=0.01,
                    max_grad_norm=1.0,
                    noise_multiplier=1.0,
                    proximal_mu=0.0,
                    pad_id=pad_id,
                    seed=2,
                ).result.train_loss
            ),
        ),
    )
    for label, run in loops:
        run(2)  # warm-up: kernels are chosen and memory allocated on the first steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        begun = time.perf_counter()
        loss = run(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - begun) / args.steps
        report[f"{label}_loss"] = loss
        report[f"{label}_seconds_per_step"] = seconds
        print(f"{label}: loss {loss:.4f}, {seconds * 1000:.1f} ms per step of 16", flush=True)
        if not math.isfinite(loss):
            problems.append(f"{label} loss is not finite: {loss}")
    state = loaded.adapter_template
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in state.values()):
        problems.append("adapter state is not CPU fp32")
    begun = time.perf_counter()
    with compute_in(loaded.precision.precision, device):
        metrics = evaluate_task_gold(
            loaded.model,
            loaded.tokenizer,
            task,
            max_new_tokens=8,
            batch_size=128,
            max_length=96,
        )
    report["gold_seconds"] = time.perf_counter() - begun
    report["gold_loss"] = metrics.loss
    report["gold_parts"] = {name: dict(part) for name, part in metrics.parts.items()}
    print(f"gold: loss {metrics.loss:.4f}, {report['gold_seconds']:.2f} s", flush=True)
    if not math.isfinite(metrics.loss):
        problems.append(f"gold loss is not finite: {metrics.loss}")
    if device.type == "cuda":
        report["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    report["problems"] = problems
    report["shape"] = args.shape
    (args.out / f"smoke-{args.shape}{args.tag}.json").write_text(
        json.dumps(report, indent=2, default=str) + "\n"
    )
    for problem in problems:
        print(f"SMOKE FAILED: {problem}", file=sys.stderr)
    print("smoke ok" if not problems else "smoke FAILED", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
