"""How the demo's federation was shaped: rounds against local work, on a validation split.

    python benchmarks/demo_shape.py --rounds 24 --local-epochs 0.065 --warmup 2 --out e.json
    python benchmarks/demo_shape.py --mode centralized --rounds 6 --local-epochs 0.25 ...

Trains the demo's four hospitals (src/fedsilo/configs/demo.toml) with 10% of each site's
records held out as a validation split, with the sites' own training loop and the server's
strategies (``--strategy fedavg`` or ``fedadam``), or centralized on the pooled records with
the same steps per round, and scores only the validation split at the end (never the gold
set). One torch thread. ``benchmarks/results/demo-shape.json`` holds the runs that chose the
demo's shape; the reasoning is in the demo config's header.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import torch

from fedsilo.bench.quality import (
    _centralized_states,
    _round_seed,
    _Trainer,
    learning_rate_of_round,
    site_steps,
)
from fedsilo.config import FedsiloConfig
from fedsilo.data.tasks import build_task
from fedsilo.server.strategies import SiteUpdate, build_strategy

DEMO = Path(__file__).parents[1] / "src" / "fedsilo" / "configs" / "demo.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("fedavg", "centralized", "local"), default="fedavg")
    parser.add_argument("--strategy", choices=("fedavg", "fedadam"), default="fedavg")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's rate")
    parser.add_argument(
        "--server-step", type=float, default=1.0, help="FedAvg: global += step * mean delta"
    )
    parser.add_argument(
        "--server-momentum",
        type=float,
        default=0.0,
        help="FedAvg's server_momentum (the demo config's is not inherited: give it here)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=float, default=0.5)
    parser.add_argument(
        "--local-steps", type=int, default=None, help="steps per site and round (not epochs)"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--val-share", type=float, default=0.1)
    parser.add_argument(
        "--examples-per-site", type=int, default=None, help="default: the demo config's"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    raw = tomllib.loads(DEMO.read_text(encoding="utf-8"))
    raw["run"]["rounds"] = args.rounds
    raw["train"].pop("local_steps", None)
    raw["train"].update(
        learning_rate=args.lr,
        batch_size=args.batch,
        warmup_rounds=args.warmup,
        lr_schedule=args.schedule,
    )
    if args.local_steps is not None:
        raw["train"]["local_steps"] = args.local_steps
    else:
        raw["train"]["local_epochs"] = args.local_epochs
    raw["task"]["validation_share"] = args.val_share
    if args.examples_per_site is not None:
        raw["task"]["examples_per_site"] = args.examples_per_site
    raw["strategy"] = {
        "name": args.strategy,
        "server_learning_rate": args.server_lr,
        "server_momentum": args.server_momentum,
    }
    config = FedsiloConfig.model_validate(raw)
    strategy = build_strategy(config.strategy)
    trainer = _Trainer(config, build_task(config.task, seed=config.run.seed))
    state = trainer.loaded.adapter_template
    sizes = [len(examples) for examples in trainer.examples]
    alone = [state] * len(sizes)  # local-only: each site's own adapter
    started, steps_total = time.perf_counter(), 0
    if args.mode == "centralized":
        # The quality benchmark's centralized training: the sites' steps over the pooled records.
        for round_number, rate, steps, adapter in _centralized_states(
            trainer, learning_rate=args.lr
        ):
            state = adapter
            steps_total += steps
            print(f"round {round_number} lr {rate:.2e} steps {steps_total}", flush=True)
    else:
        for round_number in range(1, args.rounds + 1):
            rate = learning_rate_of_round(config, round_number)
            if args.mode == "local":
                for index, examples in enumerate(trainer.examples):
                    steps = site_steps(config, len(examples))
                    steps_total += steps
                    alone[index] = trainer.train_round(
                        alone[index],
                        examples,
                        steps=steps,
                        learning_rate=rate,
                        seed=_round_seed(0, round_number, index),
                    )
            else:
                updates = strategy.new_sum()
                for index, examples in enumerate(trainer.examples):
                    steps = site_steps(config, len(examples))
                    steps_total += steps
                    trained = trainer.train_round(
                        state,
                        examples,
                        steps=steps,
                        learning_rate=rate,
                        seed=_round_seed(0, round_number, index),
                    )
                    delta = {name: trained[name] - state[name] for name in trained}
                    update = SiteUpdate(site=str(index), delta=delta, num_examples=len(examples))
                    updates.add(update)
                aggregated = strategy.aggregate(state, updates)
                # The strategy's own move (with its momentum), scaled by the server step.
                step = args.server_step
                state = {
                    name: state[name] + step * (aggregated[name] - state[name]) for name in state
                }
            print(f"round {round_number} lr {rate:.2e} steps {steps_total}", flush=True)
    train_seconds = time.perf_counter() - started
    result = {
        "args": {**vars(args), "out": str(args.out)},
        "train_seconds": train_seconds,
        "optimizer_steps": steps_total,
        "examples_seen": steps_total * args.batch,
        "records": sizes,
    }
    if args.mode == "local":
        # Each site's adapter on the pooled validation records: the mean and the worst site.
        per_site = [trainer.evaluate_validation(adapter) for adapter in alone]
        result["per_site"] = per_site
        for key in ("validation_loss", "validation_accuracy", "validation_category_accuracy"):
            result[key] = sum(site[key] for site in per_site) / len(per_site)
        result["worst_validation_category_accuracy"] = min(
            site["validation_category_accuracy"] for site in per_site
        )
        result["validation_count"] = per_site[0]["validation_count"]
    else:
        result.update(trainer.evaluate_validation(state))
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
