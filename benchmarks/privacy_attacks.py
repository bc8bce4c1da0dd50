"""Proof by attack: canary exposure and membership inference after federated training.

    python benchmarks/privacy_attacks.py --model tiny        # CI-sized, a few minutes on 2 cores
    python benchmarks/privacy_attacks.py --model smollm2-135m-instruct --examples 64 \
        --learning-rate 0.002   # the demo's rate; about 75 minutes on one thread
    python benchmarks/privacy_attacks.py --smoke --out /tmp/attacks.json   # seconds, tiny model
    python benchmarks/privacy_attacks.py --model smollm2-135m-instruct --recipe --resume \
        --settings no_dp   # and record_dp in a second process: the real budget, ~90 min each

With ``--recipe`` the federation trains the privacy/utility table's recipe
(``fedsilo.bench.dp_recipe``: 4 specialty hospitals of 2,000 records, its batches, rounds and
schedule, the same gold codes; each site's records are its own random draw of its specialty),
so the attacks run at the budget whose accuracy that table reports. Run folders are kept under
``--runs``, in a folder named by the measured settings, and ``--resume`` continues an
interrupted one (its ``seconds`` then count this process's part only). Without ``--recipe``,
the smaller experiment of ``CanaryExperiment`` (fixed batches, a few long rounds) trains.
Options of the other budget are refused.

Secret canaries (random MRNs in a clinical-note template) are planted several times in one
site's records; the federation trains with and without record-level DP-SGD (the same task,
rounds and steps); then the final model ranks each planted canary's secret among random
candidates (exposure, Carlini et al. 2019) next to canaries that were never planted, and a
loss-threshold attack tries to tell that site's records from held-out ones (AUC). The p-value
of each group is the chance that secrets the model never saw reach that total exposure
(`fedsilo.simulation.canary_experiment`). Writes benchmarks/results/privacy-attacks-NAME.json
(NAME: ``smollm2`` for any SmolLM2, else the model folder's name) with the full outcomes under
``results`` and the headline figures as ``no_dp`` (``p_value``, ``membership_auc``) and ``dp``
(the same and ``epsilon``, the largest spent by any site) objects.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedsilo.bench.dp_recipe import (
    DEFAULT_RECORDS_PER_SITE,
    SMOKE_RECIPE,
    DpRecipe,
    Federation,
    attack_config,
    merge_results,
    run_federation,
    stored_results,
)
from fedsilo.model.tiny import write_tiny_llama
from fedsilo.server.progress import LogReporter
from fedsilo.simulation.canary_experiment import (
    AttackOutcome,
    CanaryExperiment,
    attack,
    run_canary_experiment,
)

RESULTS = Path(__file__).parent / "results"


def _summary(outcome: dict[str, Any], *, private: bool) -> dict[str, Any]:
    """The headline of one setting: the planted canaries' p-value and the membership AUC."""
    summary = {
        "p_value": outcome["planted_p_value"],
        "membership_auc": outcome["membership_auc"],
        # Absent from results measured before the interval was recorded.
        "membership_auc_ci95": outcome.get("membership_auc_ci95"),
    }
    if private:
        spent = outcome["epsilon"] or {}
        summary["epsilon"] = max(spent.values()) if spent else None
        summary["delta"] = outcome["delta"]
    return summary


def _results_name(model: str) -> str:
    name = Path(model).name
    return "smollm2" if name.lower().startswith("smollm2") else name


def _recipe_outcome(
    federation: Federation,
    recipe: DpRecipe,
    experiment: CanaryExperiment,
    *,
    epsilon: float | None,
    held_out: int,
    work: Path,
    resume: bool,
) -> AttackOutcome:
    """Train the DP recipe's federation with the canaries planted; attack its final adapter."""
    started = time.perf_counter()
    config = attack_config(
        federation, recipe, experiment, epsilon=epsilon, held_out=held_out, work=work / "data"
    )
    run_federation(config, work / "run", resume=resume)
    outcome = attack(config, work / "run", experiment)
    return AttackOutcome(**{**outcome.__dict__, "seconds": time.perf_counter() - started})


SETTINGS = ("no_dp", "record_dp")

# Options of one budget only; given with the other, they would be silently ignored.
_EXPERIMENT_ONLY = ("rounds", "steps", "batch_size", "learning_rate", "examples")
_RECIPE_ONLY = ("records_per_site", "held_out", "runs", "resume")


def _privacy(target_epsilon: float) -> dict[str, Any]:
    """The ``[privacy]`` section of the record-level DP setting without ``--recipe``."""
    return {
        "record_level": True,
        "target_epsilon": target_epsilon,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
    }


def _header(args: argparse.Namespace, recipe: DpRecipe | None) -> dict[str, Any]:
    """What identifies a measurement: a results file of another header is not overwritten."""
    # Where the runs are kept and whether they resume do not change what is measured; with
    # the recipe, its own rounds, batches and rate replace the smaller experiment's.
    unmeasured = {"out", "settings", "runs", "resume", "recipe"}
    unmeasured |= set(_EXPERIMENT_ONLY) if recipe is not None else set(_RECIPE_ONLY)
    header: dict[str, Any] = {
        "benchmark": "privacy-attacks",
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in unmeasured},
    }
    if recipe is not None:
        header["recipe"] = recipe.to_json()
    return header


def _digest(header: dict[str, Any]) -> str:
    """A short name for a header: the first 12 hex digits of its canonical JSON's SHA-256."""
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _refuse_options_that_do_not_apply(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """Exit naming the options set that the chosen budget (``--recipe`` or not) ignores."""
    ignored = _EXPERIMENT_ONLY if args.recipe else _RECIPE_ONLY
    changed = [name for name in ignored if getattr(args, name) != parser.get_default(name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        budget = "with --recipe" if args.recipe else "without --recipe"
        parser.error(f"{flags}: not used {budget}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = CanaryExperiment(base_model="")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sites", type=int, default=None, help="default: 4 with --recipe, else 2")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--steps", type=int, default=defaults.local_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--examples", type=int, default=defaults.examples_per_site)
    parser.add_argument("--canaries", type=int, default=defaults.canaries)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--candidates", type=int, default=defaults.candidates)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument(
        "--settings",
        default="no_dp,record_dp",
        help="the settings this process trains; processes training others for the same "
        "settings share the results file (one setting per core halves the wall time)",
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="train the privacy/utility federation with the DP recipe (the real budget)",
    )
    parser.add_argument("--records-per-site", type=int, default=DEFAULT_RECORDS_PER_SITE)
    parser.add_argument(
        "--held-out",
        type=int,
        default=500,
        help="with --recipe: the first site's records held out as the membership non-members "
        "(as many of its training records are the members)",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/privacy-attacks"),
        help="with --recipe: the settings' run folders, kept for --resume",
    )
    parser.add_argument(
        "--resume", action="store_true", help="with --recipe: continue interrupted run folders"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds: checks the run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _refuse_options_that_do_not_apply(parser, args)
    if args.smoke:
        args.model, args.sites, args.rounds, args.steps = "tiny", 2, 1, 2
        args.examples, args.canaries, args.repeats, args.candidates = 8, 1, 2, 20
        args.records_per_site, args.held_out = 12, 6

    chosen = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown or not chosen:
        raise SystemExit(f"--settings: choose from {sorted(SETTINGS)}, got {args.settings}")
    if args.sites is None:
        args.sites = Federation(model="").num_sites if args.recipe else defaults.num_sites
    recipe: DpRecipe | None = None
    if args.recipe:
        recipe = SMOKE_RECIPE if args.smoke else DpRecipe()
        # Gold only before training and after the last round: the attack reads the final
        # model, and each scoring of the gold set costs minutes of the run.
        recipe = replace(recipe, eval_every_rounds=recipe.rounds)
    default = RESULTS / f"privacy-attacks-{_results_name(args.model)}.json"
    smoke_name = "privacy-attacks-smoke" + ("-recipe" if args.recipe else "") + ".json"
    out = args.out or (Path(tempfile.gettempdir()) / smoke_name if args.smoke else default)
    header = _header(args, recipe)
    # Refuse a results file of other settings now, not after hours of training.
    stored_results(out, header)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Run folders are named by what is measured: a run of other settings never resumes
        # another's checkpoints on its own (rewritten) data files.
        runs = work / "runs" if args.smoke else args.runs / _digest(header)
        # With --recipe the tiny model is kept beside the runs, so that a run can resume.
        tiny_home = runs if args.recipe else work
        base = str(write_tiny_llama(tiny_home / "tiny")) if args.model == "tiny" else args.model
        experiment = CanaryExperiment(
            base_model=base,
            num_sites=args.sites,
            rounds=args.rounds,
            local_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            examples_per_site=args.examples,
            canaries=args.canaries,
            repeats=args.repeats,
            candidates=args.candidates,
        )
        federation = Federation(
            model=base, num_sites=args.sites, records_per_site=args.records_per_site
        )
        for name in SETTINGS:
            if name not in chosen:
                continue
            private = name == "record_dp"
            if recipe is not None:
                outcome = _recipe_outcome(
                    federation,
                    recipe,
                    experiment,
                    epsilon=args.target_epsilon if private else None,
                    held_out=args.held_out,
                    work=runs / name,
                    resume=args.resume,
                )
            else:
                outcome = run_canary_experiment(
                    experiment,
                    work / name,
                    privacy=_privacy(args.target_epsilon) if private else {},
                    reporter=LogReporter(),
                )
            results[name] = outcome.to_json()
            shown = ("planted_mean", "never_inserted_mean", "planted_p_value", "membership_auc")
            print(name, json.dumps({k: results[name][k] for k in shown}))

    def with_ours(previous: dict[str, Any] | None) -> dict[str, Any]:
        # Another process may have measured the other setting for the same run settings.
        merged = {**(previous or {}).get("results", {}), **results}
        return {
            "no_dp": _summary(merged["no_dp"], private=False) if "no_dp" in merged else None,
            "dp": _summary(merged["record_dp"], private=True) if "record_dp" in merged else None,
            "results": merged,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    merge_results(out, header, with_ours)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
