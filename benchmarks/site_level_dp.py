"""From how many sites site-level DP is worth it: utility against epsilon as the federation grows.

    python benchmarks/site_level_dp.py [--resume] [--sizes 10:10,100:10,1000:100]
        [--epsilons 1,3,8,inf] [--seeds 0 1 2] [--distributed 100:10]
    python benchmarks/site_level_dp.py --smoke --out /tmp/site-level-dp.json   # seconds

Site-level DP protects one site's whole data; its noise is added once to the sum of a round's
clipped site updates, so what it costs in utility depends on how many sites a round averages.
This benchmark measures that on a small model, the tiny random-init Llama of the tests (2
layers, hidden size 64, SmolLM2's tokenizer; LoRA rank 8), which trains in milliseconds, so
federations of 10 to 1,000 simulated sites run on one CPU thread. Each federation ``N:M`` has N
sites of 8 ICD-10-CM records each (Dirichlet(1) over chapters) and draws M of them per round
(fixed-size sampling without replacement); every site takes 2 local steps of 4 per round for 20
rounds of FedAvg.

For every size, settings: no DP, then site-level DP at each epsilon (delta 1e-5). The noise
multiplier is the smallest the accountant allows for the whole run
(``calibrate_site_noise_multiplier``: the SampledSitesGaussianEvent of 20 rounds of M of N).
The clip norm is the median L2 norm of 16 sites' first-round updates without DP, measured from
the same start (never from the gold set). Utility is the drop of the gold loss (mean
answer-token cross-entropy on the task's held-out gold codes) from the untrained model, as a
share of the drop without DP at the same size; a share near 0 means the noise drowned the
updates. Each setting runs once per seed (data, sampling and initialisation; the noise is drawn
from the operating system's secure source, as in production); rows hold the mean and a 95%
t-interval over seeds.

``--distributed N:M``: the same settings under secure aggregation ("secagg"), where each site adds
its share of the noise before masking (distributed DP: any majority of the cohort reaches the
central noise, so a full cohort carries more than it) to compare with central site-level DP.

Writes benchmarks/results/site-level-dp.json after every run (``--resume`` keeps the runs already
there for the same settings).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from fedsilo.bench.dp_recipe import (
    ResultsFileConflictError,
    run_federation,
    save_row,
    stored_results,
)
from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.data.encode import encode_records
from fedsilo.data.tasks import build_task
from fedsilo.model.tiny import write_tiny_llama
from fedsilo.privacy.calibration import calibrate_site_noise_multiplier
from fedsilo.training.loop import train_plain

RESULTS = Path(__file__).parent / "results"
ROUNDS = 20
LOCAL_STEPS = 2
BATCH_SIZE = 4
LEARNING_RATE = 0.01
RECORDS_PER_SITE = 8
GOLD_SIZE = 64
DELTA = 1e-5
CLIP_PROBE_SITES = 16


def _size(text: str) -> tuple[int, int]:
    sites, _, per_round = text.partition(":")
    size = (int(sites), int(per_round or sites))
    if not 1 <= size[1] <= size[0]:
        raise SystemExit(f"a size is SITES:PER_ROUND with 1 <= PER_ROUND <= SITES, got {text}")
    return size


def _config(
    model: str,
    size: tuple[int, int],
    *,
    seed: int,
    rounds: int,
    privacy: dict[str, Any],
    secure: bool,
) -> FedsiloConfig:
    sites, per_round = size
    return parse_config(
        {
            "run": {
                "name": "site-level-dp",
                "seed": seed,
                "rounds": rounds,
                "torch_threads": 1,
                "require_site_policies": False,
            },
            "model": {"base": model},
            "task": {
                "name": "icd10",
                "num_sites": sites,
                "partition": "dirichlet",
                "alpha": 1.0,
                "examples_per_site": RECORDS_PER_SITE,
                "gold_size": GOLD_SIZE,
            },
            "train": {
                "local_steps": LOCAL_STEPS,
                "batch_size": BATCH_SIZE,
                "learning_rate": LEARNING_RATE,
                "max_length": 64,
            },
            "strategy": {"min_sites": per_round, "sites_per_round": per_round},
            "secure_aggregation": {"mode": "secagg" if secure else "none"},
            "evaluation": {"max_new_tokens": 4, "every_rounds": rounds},
            "privacy": privacy,
        },
        source="site-level DP benchmark",
    )


def first_round_update_norms(config: FedsiloConfig, *, sites: int) -> list[float]:
    """L2 norms of the first-round updates of the first ``sites`` sites, without DP."""
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=config.run.seed)
    train = config.train
    norms = []
    for index, site in enumerate(task.sites[:sites]):
        examples = encode_records(
            loaded.tokenizer,
            site.records,
            system_prompt=task.system_prompt,
            max_length=train.max_length,
            source=f"site {site.name}",
        )
        result = train_plain(
            loaded.model,
            examples,
            global_state=loaded.adapter_template,
            steps=train.local_steps or 1,
            batch_size=train.batch_size,
            learning_rate=train.learning_rate,
            proximal_mu=0.0,
            max_grad_norm=train.max_grad_norm,
            pad_id=int(loaded.tokenizer.pad_token_id),
            seed=config.run.seed + index,
        )
        squares = sum(float(torch.sum(t.double() ** 2)) for t in result.delta.values())
        norms.append(math.sqrt(squares))
    return norms


def _setting(epsilon: float, secure: bool) -> str:
    name = "no_dp" if math.isinf(epsilon) else f"eps{epsilon:g}"
    return f"{name}+secagg" if secure else name


def _run(
    model: str,
    size: tuple[int, int],
    *,
    epsilon: float,
    secure: bool,
    seed: int,
    rounds: int,
    clip: float,
    work: Path,
) -> dict[str, Any]:
    private = not math.isinf(epsilon)
    noise = (
        calibrate_site_noise_multiplier(
            target_epsilon=epsilon,
            delta=DELTA,
            sites_per_round=size[1],
            num_sites=size[0],
            rounds=rounds,
        )
        if private
        else None
    )
    privacy: dict[str, Any] = (
        {
            "site_level": True,
            "site_clip_norm": clip,
            "site_noise_multiplier": noise,
            "delta": DELTA,
        }
        if private
        else {}
    )
    config = _config(model, size, seed=seed, rounds=rounds, privacy=privacy, secure=secure)
    started = time.perf_counter()
    metrics = run_federation(config, work, resume=False)
    first, final = metrics[0], metrics[-1]
    return {
        "sites": size[0],
        "sites_per_round": size[1],
        "setting": _setting(epsilon, secure),
        "seed": seed,
        "epsilon": epsilon if private else None,
        "spent_epsilon": final.get("site_level_epsilon"),
        "delta": DELTA if private else None,
        "noise_multiplier": noise,
        "clip": clip if private else None,
        "untrained_gold_loss": first["gold_loss"],
        "gold_loss": final["gold_loss"],
        "gold_count": final.get("gold_count"),
        "seconds": time.perf_counter() - started,
    }


def _interval(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    mean, sem = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return [mean - half, mean + half]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (size, setting): the gold-loss drop kept relative to no DP, mean and interval."""
    baseline = {
        (run["sites"], run["sites_per_round"], run["seed"]): run["gold_loss"]
        for run in runs
        if run["setting"] == "no_dp"
    }
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["sites"], run["sites_per_round"], run["setting"]), []).append(run)
    rows = []
    for (sites, per_round, setting), members in sorted(groups.items()):
        shares = []
        for run in members:
            reference = baseline.get((sites, per_round, run["seed"]))
            drop = run["untrained_gold_loss"] - (reference if reference is not None else math.nan)
            if reference is not None and drop > 0:
                shares.append((run["untrained_gold_loss"] - run["gold_loss"]) / drop)
        losses = [run["gold_loss"] for run in members]
        rows.append(
            {
                "sites": sites,
                "sites_per_round": per_round,
                "setting": setting,
                "epsilon": members[0]["epsilon"],
                "noise_multiplier": members[0]["noise_multiplier"],
                "seeds": sorted(run["seed"] for run in members),
                "gold_loss": statistics.mean(losses),
                "gold_loss_ci95": _interval(losses),
                "share_of_non_private": statistics.mean(shares) if shares else None,
                "share_ci95": _interval(shares),
            }
        )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10:10,100:10,1000:100")
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distributed", default="100:10", help="sizes also run under secagg")
    parser.add_argument("--distributed-epsilons", default="8,inf")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="2 small sizes, 2 rounds, 1 seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.sizes, args.distributed, args.seeds, args.rounds = "4:4,8:4", "4:4", [0], 2
        args.epsilons, args.distributed_epsilons = "8,inf", "8,inf"
    out = args.out or (
        Path(tempfile.gettempdir()) / "site-level-dp-smoke.json"
        if args.smoke
        else RESULTS / "site-level-dp.json"
    )
    epsilons = [float(part) for part in args.epsilons.split(",")]
    # No DP first: the shares are read against it.
    plan = [
        (_size(size), epsilon, False)
        for size in args.sizes.split(",")
        for epsilon in sorted(epsilons, key=lambda e: not math.isinf(e))
    ]
    plan += [
        (_size(size), float(epsilon), True)
        for size in filter(None, args.distributed.split(","))
        for epsilon in args.distributed_epsilons.split(",")
    ]
    header = {
        "benchmark": "site-level-dp",
        "model": "tiny random-init Llama (2 layers, hidden 64), LoRA rank 8",
        "rounds": args.rounds,
        "local_steps": LOCAL_STEPS,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "records_per_site": RECORDS_PER_SITE,
        "gold_size": GOLD_SIZE,
        "delta": DELTA,
        "clip_rule": f"median first-round update norm of {CLIP_PROBE_SITES} sites without DP",
    }
    done: list[dict[str, Any]] = []
    try:
        previous = stored_results(out, header)
    except ResultsFileConflictError as error:
        raise SystemExit(str(error)) from error
    if args.resume and previous is not None:
        done = previous.get("runs", [])

    def key(run: dict[str, Any]) -> tuple[Any, ...]:
        return run["sites"], run["sites_per_round"], run["setting"], run["seed"]

    finished = {key(run) for run in done}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(write_tiny_llama(work / "tiny", seed=0))
        clips: dict[tuple[tuple[int, int], int], float] = {}
        for size, epsilon, secure in plan:
            for seed in args.seeds:
                wanted = (size[0], size[1], _setting(epsilon, secure), seed)
                if wanted in finished:
                    continue
                if (size, seed) not in clips:
                    probe = _config(model, size, seed=seed, rounds=1, privacy={}, secure=False)
                    norms = first_round_update_norms(probe, sites=CLIP_PROBE_SITES)
                    clips[(size, seed)] = statistics.median(norms)
                run = _run(
                    model,
                    size,
                    epsilon=epsilon,
                    secure=secure,
                    seed=seed,
                    rounds=args.rounds,
                    clip=clips[(size, seed)],
                    work=work / "run",
                )
                run["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                print(json.dumps(run), flush=True)
                done = save_row(
                    out,
                    header,
                    run,
                    rows_key="runs",
                    same=lambda old, new: key(old) == key(new),
                    summary=summarize,
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
