"""Choose the DP recipe's expected batch, clip norm and learning rate on the sites' own data.

    python benchmarks/dp_sweep.py [--resume] [--epsilon 8] [--batch-sizes 256]
        [--clips 0.1,1,10] [--learning-rates 5e-4,2e-3,5e-3] [--records-per-site 2000]
    python benchmarks/dp_sweep.py --smoke --out /tmp/dp-sweep.json    # tiny model, seconds
    python benchmarks/dp_sweep.py --epsilon inf --out benchmarks/results/dp-sweep-no-dp.json ...

Every (expected batch, clip, learning rate) of the grid trains the federation of
``fedsilo.bench.dp_recipe`` with record-level DP at one fixed target epsilon for the whole run
(``--epsilon inf``: the same points without DP, the reference a point's privacy cost is read
against). Each site holds out the last ``--validation-share`` of its own records; the pooled
held-out records are the only evaluation set, and the chosen point is the one with the lowest
validation loss (mean answer-token cross-entropy). The ICD-10 gold set is never scored here, so
choosing on it cannot flatter the privacy/utility table. Local work is counted in epochs, so
the expected batch sets the number of steps as well as the noise on each of them (``z * C /
batch``, z calibrated to the same epsilon for every point): a large batch is quiet but takes
few steps. Writes benchmarks/results/dp-sweep.json after every grid point
(``--resume`` keeps the points already measured with the same settings).

The sweep's own runs are not private with respect to the validation records' choice of
hyperparameters (the selection itself is not accounted); the published recipes do the same
and report it, and so do we.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedsilo.bench.dp_recipe import (
    DpRecipe,
    Federation,
    ResultsFileConflictError,
    add_schedule_arguments,
    run_federation,
    save_row,
    schedule_from,
    smoke_setup,
    stored_results,
    validation_config,
)

RESULTS = Path(__file__).parent / "results"


def _floats(text: str, name: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not value > 0 for value in values):
        raise SystemExit(f"{name} must be a comma-separated list of positive numbers, got {text}")
    return values


def _whole(text: str, name: str) -> list[int]:
    values = _floats(text, name)
    if any(value != int(value) for value in values):
        raise SystemExit(f"{name} must be whole numbers, got {text}")
    return [int(value) for value in values]


def _key(point: dict[str, Any]) -> tuple[int, float, float]:
    return (int(point["expected_batch_size"]), float(point["clip"]), float(point["learning_rate"]))


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The grid point with the lowest validation loss (the first of equals), None if none."""
    return min(points, key=lambda point: point["validation_loss"], default=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults, recipe_defaults = Federation(model="smollm2-135m-instruct"), DpRecipe()
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--sites", type=int, default=defaults.num_sites)
    parser.add_argument("--records-per-site", type=int, default=defaults.records_per_site)
    parser.add_argument("--validation-share", type=float, default=0.05)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--batch-sizes", default=str(recipe_defaults.expected_batch_size))
    parser.add_argument("--clips", default="0.1,1,10")
    parser.add_argument("--learning-rates", default="5e-4,2e-3,5e-3")
    parser.add_argument("--rounds", type=int, default=recipe_defaults.rounds)
    parser.add_argument("--local-epochs", type=float, default=recipe_defaults.local_epochs)
    parser.add_argument("--ffa", action="store_true", help="FFA-LoRA (A frozen) instead of LoRA")
    add_schedule_arguments(parser)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", type=Path, default=Path("runs") / "dp-sweep")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 small sites, 2x1 grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clips = _floats(args.clips, "--clips")
    rates = _floats(args.learning_rates, "--learning-rates")
    batches = _whole(args.batch_sizes, "--batch-sizes")
    if not args.epsilon > 0:
        raise SystemExit(f"--epsilon must be positive, got {args.epsilon}")

    scratch = Path(tempfile.mkdtemp(prefix="fedsilo-dp-sweep-"))
    if args.smoke:
        federation, recipe = smoke_setup(scratch)
        federation = replace(federation, records_per_site=16)
        clips, rates, batches = [0.1, 1.0], [1e-2], [recipe.expected_batch_size]
        out, runs, model = args.out or scratch / "dp-sweep.json", scratch / "runs", "tiny"
        validation_share = 0.25
    else:
        federation = Federation(
            model=args.model, num_sites=args.sites, records_per_site=args.records_per_site
        )
        recipe = schedule_from(
            args,
            DpRecipe(
                local_epochs=args.local_epochs,
                rounds=args.rounds,
                ffa=args.ffa,
            ),
        )
        out, runs, model = args.out or RESULTS / "dp-sweep.json", args.runs, args.model
        validation_share = args.validation_share
    header = {
        "benchmark": "dp-sweep",
        "model": model,
        "records_per_site": federation.records_per_site,
        "num_sites": federation.num_sites,
        "validation_share": validation_share,
        # None: the no-DP reference at the same points (--epsilon inf).
        "epsilon": None if math.isinf(args.epsilon) else args.epsilon,
        "recipe": {
            k: v
            for k, v in recipe.to_json().items()
            if k not in ("expected_batch_size", "learning_rate", "max_grad_norm")
        },
        "selection": "lowest validation loss on the sites' held-out records (never the gold set)",
    }
    points: list[dict[str, Any]] = []
    try:
        previous = stored_results(out, header)
    except ResultsFileConflictError as error:
        raise SystemExit(str(error)) from error
    if args.resume and previous is not None:
        points = list(previous["points"])
    for batch, clip, rate in itertools.product(batches, clips, rates):
        if any(_key(p) == (batch, clip, rate) for p in points):
            print(f"batch {batch}, clip {clip:g}, learning rate {rate:g}: already measured, kept")
            continue
        point_recipe = replace(
            recipe, expected_batch_size=batch, max_grad_norm=clip, learning_rate=rate
        )
        name = f"batch{batch}-clip{clip:g}-lr{rate:g}"
        config = validation_config(
            federation,
            point_recipe,
            epsilon=args.epsilon,
            validation_share=validation_share,
            work=runs / name / "data",
        )
        started = time.perf_counter()
        metrics = run_federation(config, runs / name / "run", resume=args.resume)
        final = metrics[-1]
        point = {
            "expected_batch_size": batch,
            "clip": clip,
            "learning_rate": rate,
            "validation_loss": final["gold_loss"],
            "scored_rounds": [m["round"] for m in metrics if "gold_loss" in m],
            "validation_loss_per_round": [m["gold_loss"] for m in metrics if "gold_loss" in m],
            "validation_category_accuracy": final["gold_category_accuracy"],
            "validation_count": final["gold_count"],
            "spent_epsilon": final.get("epsilon"),
            "seconds": time.perf_counter() - started,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        points = save_row(
            out,
            header,
            point,
            rows_key="points",
            same=lambda old, new: _key(old) == _key(new),
            summary=lambda points: {"best": best_point(points)},
        )
        print(name, json.dumps({"validation_loss": final["gold_loss"]}))
    if args.smoke:  # the smoke run's federations are not kept, only its results
        shutil.rmtree(runs, ignore_errors=True)
    print(f"wrote {out}; best: {best_point(points)}")


if __name__ == "__main__":
    main()
