"""bf16 against fp32 training on SmolLM2: the same seed, examples and batches, 200 steps.

Each precision trains in its own process (one torch thread) with fedsilo's loop from the same
initial adapter on the same ICD-10 site examples, then scores the gold set's answer loss in
the same precision. The trainer issue's correctness goal: final training loss (mean of the
last 20 steps) and gold loss within 3% of each other.

    python benchmarks/precision_agreement.py [--steps 200] [--batch-size 8]

Writes benchmarks/results/precision-agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def run_one(precision: str, steps: int, batch_size: int) -> dict[str, Any]:
    from fedsilo.client.site import load_model_with_adapter
    from fedsilo.config import parse_config
    from fedsilo.data.encode import encode_records
    from fedsilo.data.tasks import build_task
    from fedsilo.evaluation.gold import answer_losses
    from fedsilo.model.adapters import set_adapter_state
    from fedsilo.training.loop import StepProgress, train_plain
    from fedsilo.training.precision import compute_in

    torch.set_num_threads(1)
    config = parse_config(
        {
            "model": {"base": "smollm2-135m-instruct"},
            "task": {"num_sites": 4, "examples_per_site": 256, "gold_size": 96},
            "train": {"max_length": 96, "precision": precision},
        },
        source="benchmark",
    )
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=0)
    records = [record for site in task.sites for record in site.records]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=task.system_prompt, max_length=96, source="sites"
    )
    losses: list[float] = []

    def on_step(progress: StepProgress) -> None:
        if progress.loss is not None:
            losses.append(progress.loss)

    result = train_plain(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=steps,
        batch_size=batch_size,
        learning_rate=1e-3,
        proximal_mu=0.0,
        max_grad_norm=1.0,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=0,
        on_step=on_step,
    )
    trained = {k: loaded.adapter_template[k] + result.delta[k] for k in result.delta}
    set_adapter_state(loaded.model, trained)
    with compute_in(loaded.precision.precision):
        gold = answer_losses(
            loaded.model,
            loaded.tokenizer,
            task.gold,
            system_prompt=task.system_prompt,
            max_length=96,
            batch_size=16,
        )
    return {
        "precision": loaded.precision.precision,
        "compiled": loaded.compiled.enabled,  # compile = "auto", as a site trains
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": result.seconds,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / result.seconds,
        "padding_share": result.padding_share,
        "train_losses": losses,
        "final_train_loss": float(np.mean(losses[-20:])),
        "gold_loss": float(np.mean(gold)),
        "gold_count": len(gold),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--one", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "precision-agreement.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch_size)))
        return
    rows = {}
    for precision in ("bf16", "fp32"):
        command = [sys.executable, __file__, "--one", precision, "--steps", str(args.steps)]
        done = subprocess.run(
            [*command, "--batch-size", str(args.batch_size)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        rows[precision] = json.loads(done.stdout.strip().splitlines()[-1])
    bf16, fp32 = rows["bf16"], rows["fp32"]
    result = {
        "benchmark": "precision-agreement",
        "model": "smollm2-135m-instruct",
        "runs": rows,
        "train_loss_difference": abs(bf16["final_train_loss"] / fp32["final_train_loss"] - 1),
        "gold_loss_difference": abs(bf16["gold_loss"] / fp32["gold_loss"] - 1),
        "speedup_bf16": bf16["tokens_per_s"] / fp32["tokens_per_s"],
        "goal": "train and gold loss within 3%",
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("train_loss_difference", "gold_loss_difference")}))


if __name__ == "__main__":
    main()
