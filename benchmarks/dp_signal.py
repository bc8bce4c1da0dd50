"""How much of a DP-SGD step is signal: per-example gradients against the noise, on the real model.

    python benchmarks/dp_signal.py [--records 256] [--epsilons 1,3,8]
        [--checkpoint eps3=runs/privacy-utility-v2/eps3/checkpoints/round-28/adapter.safetensors]
        [--batch-size 128] [--lora-rank 2] [--lora-targets q_proj,v_proj] [--out FILE]
    python benchmarks/dp_signal.py --smoke --out /tmp/dp-signal.json   # tiny model, seconds

For the DP recipe's federation (``fedsilo.bench.dp_recipe``: its sites, LoRA shape, expected
batch B, clip C, rounds and local epochs), the adapter's per-example gradients are taken on the
first ``--records`` records of the first site, once at the untrained adapter and once at each
``--checkpoint`` (an adapter.safetensors of a run of the same LoRA shape). Written per point:
the distribution of per-example gradient norms, the norm of the mean clipped gradient (the
signal of one step; at most C, and C only if every example's clipped gradient points the same
way) and the mean loss. Per epsilon: the noise multiplier z each site calibrates for the
recipe's run (the computation of a site's own plan: sampling rate B / records, every planned
step), and the noise on one averaged gradient, z C / B per coordinate and z C sqrt(d) / B in
norm over the d trained parameters. Their ratio is the step's signal-to-noise in norm; FedAvg
over K sites averages K independent noises (the noise norm falls by sqrt K) while the sites'
signals, drawn from different specialties, need not add up.

Why it matters: Adam scales each coordinate by its own gradient spread, so where the noise
dominates every coordinate, a step moves each coordinate about one learning rate in a random
direction and only the signal's small share of it adds up across steps. Writes
benchmarks/results/dp-signal.json. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.bench.dp_recipe import (
    DpRecipe,
    Federation,
    add_schedule_arguments,
    schedule_from,
    smoke_setup,
    utility_config,
)
from fedsilo.client.site import LoadedModel, load_model_with_adapter
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.tasks import build_task
from fedsilo.model.adapters import load_adapter, set_adapter_state
from fedsilo.model.lora_forward import per_example_lora
from fedsilo.privacy.calibration import calibrate_noise_multiplier
from fedsilo.privacy.dp_sgd import (
    DEFAULT_MICRO_BATCH_SIZE,
    clip_per_example,
    clipped_per_example_gradients,
    per_example_norms,
)
from fedsilo.protocol.schedule import local_steps_for
from fedsilo.storage import write_text_atomic
from fedsilo.training.loop import micro_batches

RESULTS = Path(__file__).parent / "results"


def gradient_point(
    loaded: LoadedModel, examples: Sequence[Example], *, clip: float
) -> dict[str, Any]:
    """Per-example gradient norms of the adapter, and the mean clipped gradient's norm."""
    model = loaded.model
    params = [param for param in model.parameters() if param.requires_grad]
    pad_id = int(loaded.tokenizer.pad_token_id)
    model.train(True)
    norms: list[float] = []
    losses: list[float] = []
    clipped_sum = [torch.zeros_like(param, dtype=torch.float32) for param in params]
    raw_sum = [torch.zeros_like(param, dtype=torch.float32) for param in params]
    with per_example_lora(model, params) as per_example:
        for piece in micro_batches(examples, size=DEFAULT_MICRO_BATCH_SIZE):
            # An infinite bound clips nothing: the rows are the raw per-example gradients.
            raw, piece_losses = clipped_per_example_gradients(
                model,
                piece,
                per_example=per_example,
                pad_id=pad_id,
                max_grad_norm=math.inf,
                precision=loaded.precision.precision,
            )
            norms += per_example_norms(raw).tolist()
            losses += piece_losses.tolist()
            for total, grad in zip(raw_sum, raw, strict=True):
                total += grad.sum(dim=0)
            clipped = clip_per_example(raw, max_grad_norm=clip)
            for total, grad in zip(clipped_sum, clipped, strict=True):
                total += grad.sum(dim=0)
            for param in params:
                param.grad = None
    model.train(False)
    count = len(examples)

    def mean_norm(sums: list[torch.Tensor]) -> float:
        return float(torch.stack([(total / count).pow(2).sum() for total in sums]).sum().sqrt())

    values = np.asarray(norms)
    return {
        "records": count,
        "mean_loss": float(np.mean(losses)),
        "per_example_norm": {
            "p10": float(np.percentile(values, 10)),
            "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean()),
        },
        "share_clipped": float((values > clip).mean()),
        "mean_gradient_norm": mean_norm(raw_sum),
        "mean_clipped_gradient_norm": mean_norm(clipped_sum),
    }


def noise_per_epsilon(
    recipe: DpRecipe, *, records_per_site: int, parameters: int, epsilons: Sequence[float]
) -> list[dict[str, Any]]:
    """What each site's calibration gives at each epsilon, and the noise on one mean gradient."""
    batch = recipe.expected_batch_size
    steps_per_round = local_steps_for(
        local_steps=0,
        local_epochs=recipe.local_epochs,
        batch_size=batch,
        num_examples=records_per_site,
    )
    steps = steps_per_round * recipe.rounds
    rows = []
    for epsilon in epsilons:
        noise = calibrate_noise_multiplier(
            target_epsilon=epsilon,
            delta=recipe.delta,
            sampling_rate=min(1.0, batch / records_per_site),
            steps=steps,
        )
        per_coordinate = noise * recipe.max_grad_norm / batch
        rows.append(
            {
                "epsilon": epsilon,
                "delta": recipe.delta,
                "noise_multiplier": noise,
                "steps": steps,
                "noise_per_coordinate": per_coordinate,
                "noise_norm": per_coordinate * math.sqrt(parameters),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter.safetensors of a run with the recipe's LoRA shape (repeatable)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DpRecipe().expected_batch_size,
        help="the recipe's expected batch (another recipe than the measured one: give --out)",
    )
    add_schedule_arguments(parser)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 2 small sites (give --out)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epsilons = [float(text) for text in args.epsilons.split(",") if text.strip()]
    if args.records < 1 or any(not 0 < epsilon < math.inf for epsilon in epsilons):
        raise SystemExit("--records must be positive and --epsilons finite and positive")
    checkpoints: list[tuple[str, Path]] = []
    for text in args.checkpoint:
        name, _, path = text.partition("=")
        if not name or not path:
            raise SystemExit(f"--checkpoint takes NAME=PATH, got {text!r}")
        checkpoints.append((name, Path(path)))

    recipe = schedule_from(args, DpRecipe(expected_batch_size=args.batch_size))
    if args.smoke:
        if recipe != DpRecipe():
            raise SystemExit("--smoke measures its own tiny recipe: leave out the recipe flags")
        federation, recipe = smoke_setup(Path(tempfile.mkdtemp(prefix="fedsilo-dp-signal-")))
    else:
        federation = Federation(model=args.model)
    started = time.perf_counter()
    config = utility_config(federation, recipe, epsilon=None)
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=federation.seed)
    site = task.sites[0]
    examples = encode_records(
        loaded.tokenizer,
        list(site.records[: args.records]),
        system_prompt=task.system_prompt,
        max_length=recipe.max_length,
        source=f"site {site.name}",
    )
    parameters = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    points = [{"point": "untrained", **gradient_point(loaded, examples, clip=recipe.max_grad_norm)}]
    for name, path in checkpoints:
        set_adapter_state(loaded.model, load_adapter(path))
        figures = gradient_point(loaded, examples, clip=recipe.max_grad_norm)
        points.append({"point": name, "checkpoint": str(path), **figures})
    noise = noise_per_epsilon(
        recipe,
        records_per_site=federation.records_per_site,
        parameters=parameters,
        epsilons=epsilons,
    )
    ratios = [
        {
            "point": point["point"],
            "epsilon": row["epsilon"],
            "signal_to_noise": point["mean_clipped_gradient_norm"] / row["noise_norm"],
            "signal_to_noise_fedavg": point["mean_clipped_gradient_norm"]
            / row["noise_norm"]
            * math.sqrt(federation.num_sites),
        }
        for point in points
        for row in noise
    ]
    result = {
        "benchmark": "dp-signal",
        "model": "tiny" if args.smoke else args.model,
        "site": site.name,
        "records_per_site": federation.records_per_site,
        "num_sites": federation.num_sites,
        "recipe": recipe.to_json(),
        "trained_parameters": parameters,
        "precision": loaded.precision.precision,
        "points": points,
        "noise": noise,
        "signal_to_noise": ratios,
        "seconds": time.perf_counter() - started,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": 1,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out = args.out or RESULTS / "dp-signal.json"
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    for ratio in ratios:
        print(json.dumps(ratio))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
