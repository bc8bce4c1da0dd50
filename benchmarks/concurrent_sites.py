"""Two simulated sites in turn with two torch threads, or side by side with one thread each.

This is the choice behind ``run.concurrent_sites``: the in-process engine either trains its
sites one after another in the main thread with ``torch_threads`` threads, or in lanes
(fedsilo.simulation.inprocess_grid), one Python thread per lane with its own copy of the model
and ``torch_threads // concurrent_sites`` torch threads. Both ways train the demo's first two
hospitals (src/fedsilo/configs/demo.toml: SmolLM2, LoRA rank 16, batch 8) for the same steps
with the sites' loop, alternately, ``--repeats`` times, in one process, so the ratio is read
side by side on the same machine at the same moment. Run it on otherwise idle cores.

    python benchmarks/concurrent_sites.py [--steps 8] [--repeats 3]

Writes benchmarks/results/concurrent-sites.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from fedsilo.client.site import LoadedModel, load_model_with_adapter
from fedsilo.config import load_config
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.tasks import build_task
from fedsilo.training.loop import train_plain

DEMO = Path(__file__).parents[1] / "src" / "fedsilo" / "configs" / "demo.toml"
OUT = Path(__file__).parent / "results" / "concurrent-sites.json"


def _train(loaded: LoadedModel, examples: list[Example], *, steps: int, seed: int) -> int:
    """Train ``steps`` steps; the tokens processed."""
    result = train_plain(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=steps,
        batch_size=8,
        learning_rate=2e-3,
        proximal_mu=0.0,
        max_grad_norm=1.0,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=seed,
    )
    return result.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="steps per site per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    config = load_config(DEMO)
    task = build_task(config.task, seed=config.run.seed)
    models = [load_model_with_adapter(config) for _ in range(2)]
    examples = [
        encode_records(
            models[0].tokenizer,
            site.records,
            system_prompt=task.system_prompt,
            max_length=config.train.max_length,
            source=site.name,
        )
        for site in task.sites[:2]
    ]

    def in_turn() -> float:
        torch.set_num_threads(2)
        started = time.perf_counter()
        tokens = sum(
            _train(models[index], examples[index], steps=args.steps, seed=index)
            for index in range(2)
        )
        return tokens / (time.perf_counter() - started)

    def side_by_side() -> float:
        tokens = [0, 0]

        def lane(index: int) -> None:
            torch.set_num_threads(1)  # per thread, as the grid's lanes do
            tokens[index] = _train(models[index], examples[index], steps=args.steps, seed=index)

        started = time.perf_counter()
        workers = [threading.Thread(target=lane, args=(index,)) for index in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(tokens) / (time.perf_counter() - started)

    in_turn(), side_by_side()  # warm-up: first-call allocations and kernel selection
    rates: dict[str, list[float]] = {"in_turn_2_threads": [], "side_by_side_2x1_thread": []}
    for repeat in range(args.repeats):
        rates["in_turn_2_threads"].append(in_turn())
        rates["side_by_side_2x1_thread"].append(side_by_side())
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in rates.items())
        )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "benchmark": "concurrent-sites",
        "what": (
            "tokens/s of two simulated sites trained in turn (main thread, 2 torch threads) "
            "against side by side (two Python threads, 1 torch thread each, one model copy "
            "each); the demo's first two sites, batch 8, alternating measurements in one process"
        ),
        "script": "benchmarks/concurrent_sites.py",
        "model": config.model.base,
        "precision": models[0].precision.precision,
        "steps_per_site": args.steps,
        "repeats": args.repeats,
        "tokens_per_s": rates,
        "median_tokens_per_s": medians,
        "speedup_side_by_side": medians["side_by_side_2x1_thread"] / medians["in_turn_2_threads"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "measured_on": datetime.date.today().isoformat(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
